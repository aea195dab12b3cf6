//! `carrot deploy`: what a cluster needs to run identical, stateless `carrot serve` replicas of one
//! exported model — container files, KServe resources and plain Kubernetes resources.
//!
//! ```text
//! OUT/
//!   Containerfile                      the server image (carrot + ONNX Runtime from context/)
//!   Containerfile.model                a KServe "model car" image holding the export in /models
//!   context/                           carrot and the ONNX Runtime libraries it runs with
//!   kserve/cluster-serving-runtime.yaml
//!   kserve/inference-service.yaml      Standard (raw) mode, KEDA on carrot_requests_* from Prometheus
//!   kserve/inference-service-knative.yaml   Knative mode, scaled on request concurrency
//!   kubernetes/deployment.yaml         for clusters without KServe
//!   kubernetes/service.yaml
//!   kubernetes/scaled-object.yaml      KEDA, same trigger as the KServe one
//!   README.md                          the commands, in order
//! ```
//!
//! Every pod runs `carrot serve --host 0.0.0.0 --allow-remote` with the API key from the secret
//! `NAME-api-key`, probes `/ready` (readiness) and `/health` (liveness), and gets a termination
//! grace period a few seconds longer than its drain deadline.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use carrot_contract::Manifest;

/// `carrot deploy` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct DeployArgs {
    /// Exported directory (carrot.json) to deploy.
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Where to write the files (must not exist unless --force).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// cpu, cuda or tensorrt: the base image, the ONNX Runtime libraries and the GPU request.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Replicas to start with (the autoscaler's minimum).
    #[arg(long, default_value_t = 1)]
    pub replicas: u32,
    /// The autoscaler's maximum.
    #[arg(long, default_value_t = 8)]
    pub max_replicas: u32,
    /// Requests waiting or running per replica before the autoscaler adds one.
    #[arg(long, default_value_t = 2)]
    pub target_requests: u32,
    /// Name of the resources and of the served model (default: the export directory's name).
    #[arg(long)]
    pub name: Option<String>,
    /// Server image reference the manifests use.
    #[arg(long, default_value = "carrot-server:latest")]
    pub image: String,
    /// Model-car image reference (default: carrot-model-NAME:latest).
    #[arg(long)]
    pub model_image: Option<String>,
    /// Prometheus the KEDA triggers query.
    #[arg(long, default_value = "http://prometheus-operated.monitoring.svc:9090")]
    pub prometheus: String,
    /// Seconds a replica finishes its requests after SIGTERM.
    #[arg(long, default_value_t = crate::serve::DEFAULT_DRAIN_SECONDS)]
    pub drain_timeout: f64,
    /// Path to libonnxruntime.so to put in the image (else the one `carrot` would load).
    #[arg(long, value_name = "PATH")]
    pub ort_lib: Option<PathBuf>,
    /// Replace OUT if it exists.
    #[arg(long)]
    pub force: bool,
}

/// The port every container listens on.
const PORT: u16 = 8080;

/// What the manifests are written from.
#[derive(Debug, Clone)]
pub struct Plan {
    pub name: String,
    pub device: String,
    pub replicas: u32,
    pub max_replicas: u32,
    pub target_requests: u32,
    pub image: String,
    pub model_image: String,
    pub prometheus: String,
    pub drain_timeout: f64,
    /// Memory to request per replica, in MiB (the CPU estimate; GPU pods need less host memory).
    pub memory_mib: u64,
}

impl Plan {
    fn gpu(&self) -> bool {
        self.device != "cpu"
    }

    fn grace_seconds(&self) -> u64 {
        self.drain_timeout.ceil() as u64 + 5
    }

    /// Requests waiting and running over this deployment's pods (Prometheus' `pod` label, as the
    /// usual Kubernetes scrape configurations set it).
    fn query(&self) -> String {
        format!(
            "sum(carrot_requests_running{{pod=~\"{0}-.*\"}}) + sum(carrot_requests_waiting{{pod=~\"{0}-.*\"}})",
            self.name
        )
    }

    fn args(&self, model_path: &str) -> Vec<String> {
        let mut args = vec![
            "serve".to_owned(),
            "--model".to_owned(),
            model_path.to_owned(),
            "--host".to_owned(),
            "0.0.0.0".to_owned(),
            "--port".to_owned(),
            PORT.to_string(),
            "--allow-remote".to_owned(),
            "--served-model-name".to_owned(),
            self.name.clone(),
            "--drain-timeout".to_owned(),
            format!("{}", self.drain_timeout),
        ];
        if self.gpu() {
            args.extend(["--device".to_owned(), self.device.clone()]);
        }
        args
    }

    /// The container's args, env, ports, probes and resources, indented by `indent` spaces.
    fn container_body(&self, indent: usize, model_path: &str) -> String {
        let pad = " ".repeat(indent);
        let mut s = String::new();
        let _ = writeln!(s, "{pad}args:");
        for a in self.args(model_path) {
            let _ = writeln!(s, "{pad}  - {}", quote(&a));
        }
        let _ = writeln!(s, "{pad}env:");
        let _ = writeln!(s, "{pad}  - name: CARROT_API_KEY");
        let _ = writeln!(s, "{pad}    valueFrom:");
        let _ = writeln!(s, "{pad}      secretKeyRef:");
        let _ = writeln!(s, "{pad}        name: {}-api-key", self.name);
        let _ = writeln!(s, "{pad}        key: key");
        let _ = writeln!(s, "{pad}ports:");
        let _ = writeln!(s, "{pad}  - containerPort: {PORT}");
        let _ = writeln!(s, "{pad}    name: http");
        let _ = writeln!(s, "{pad}    protocol: TCP");
        let _ = writeln!(s, "{pad}readinessProbe:");
        let _ = writeln!(s, "{pad}  httpGet:");
        let _ = writeln!(s, "{pad}    path: /ready");
        let _ = writeln!(s, "{pad}    port: {PORT}");
        let _ = writeln!(s, "{pad}  periodSeconds: 5");
        let _ = writeln!(s, "{pad}  failureThreshold: 3");
        let _ = writeln!(s, "{pad}livenessProbe:");
        let _ = writeln!(s, "{pad}  httpGet:");
        let _ = writeln!(s, "{pad}    path: /health");
        let _ = writeln!(s, "{pad}    port: {PORT}");
        let _ = writeln!(s, "{pad}  periodSeconds: 10");
        let _ = writeln!(s, "{pad}  failureThreshold: 6");
        let _ = writeln!(s, "{pad}resources:");
        let _ = writeln!(s, "{pad}  requests:");
        let _ = writeln!(s, "{pad}    cpu: \"2\"");
        let _ = writeln!(s, "{pad}    memory: {}Mi", self.memory_mib);
        if self.gpu() {
            let _ = writeln!(s, "{pad}    nvidia.com/gpu: \"1\"");
        }
        let _ = writeln!(s, "{pad}  limits:");
        let _ = writeln!(s, "{pad}    memory: {}Mi", self.memory_mib * 5 / 4);
        if self.gpu() {
            let _ = writeln!(s, "{pad}    nvidia.com/gpu: \"1\"");
        }
        s
    }

    pub fn containerfile(&self) -> String {
        let base = if self.gpu() {
            "nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04"
        } else {
            "debian:bookworm-slim"
        };
        format!(
            "# The carrot server: `carrot` and the ONNX Runtime it runs with (copied into context/ by\n\
             # `carrot deploy`). Build: podman build -t {image} -f Containerfile .\n\
             FROM {base}\n\
             RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \\\n    && rm -rf /var/lib/apt/lists/*\n\
             COPY context/carrot /usr/local/bin/carrot\n\
             COPY context/lib/ /opt/carrot/lib/\n\
             ENV CARROT_ORT_LIB=/opt/carrot/lib/libonnxruntime.so\n\
             ENV LD_LIBRARY_PATH=/opt/carrot/lib\n\
             EXPOSE {PORT}\n\
             USER 65532:65532\n\
             ENTRYPOINT [\"carrot\"]\n\
             CMD [\"serve\", \"--model\", \"/models\", \"--host\", \"0.0.0.0\", \"--allow-remote\"]\n",
            image = self.image,
        )
    }

    pub fn containerfile_model(&self) -> String {
        format!(
            "# A KServe model car: the exported directory in /models. Build from the export itself:\n\
             #   podman build -t {0} -f Containerfile.model EXPORT_DIR\n\
             FROM busybox:1.37\n\
             COPY . /models/\n\
             USER 65532:65532\n",
            self.model_image
        )
    }

    pub fn cluster_serving_runtime(&self) -> String {
        let mut s = format!(
            "apiVersion: serving.kserve.io/v1alpha1\n\
             kind: ClusterServingRuntime\n\
             metadata:\n  name: carrot\n\
             spec:\n  supportedModelFormats:\n    - name: carrot\n      version: \"1\"\n      autoSelect: true\n\
             \x20 protocolVersions:\n    - v1\n\
             \x20 containers:\n    - name: kserve-container\n      image: {}\n",
            self.image
        );
        s.push_str(&self.container_body(6, "/mnt/models"));
        s
    }

    fn isvc_head(&self, annotations: &[(&str, String)]) -> String {
        let mut s = format!(
            "apiVersion: serving.kserve.io/v1beta1\nkind: InferenceService\nmetadata:\n  name: {}\n  annotations:\n",
            self.name
        );
        for (k, v) in annotations {
            let _ = writeln!(s, "    {k}: {}", quote(v));
        }
        s
    }

    fn isvc_model(&self) -> String {
        format!(
            "    model:\n      modelFormat:\n        name: carrot\n      runtime: carrot\n      storageUri: {}\n",
            quote(&format!("oci://{}", self.model_image))
        )
    }

    /// Standard (raw Deployment) mode, scaled by KEDA on the requests waiting and running.
    pub fn inference_service(&self) -> String {
        let mut s = self.isvc_head(&[
            ("serving.kserve.io/deploymentMode", "RawDeployment".into()),
            ("serving.kserve.io/autoscalerClass", "keda".into()),
            (
                "serving.kserve.io/enable-prometheus-scraping",
                "true".into(),
            ),
            ("prometheus.io/scrape", "true".into()),
            ("prometheus.io/path", "/metrics".into()),
            ("prometheus.io/port", PORT.to_string()),
        ]);
        let _ = write!(
            s,
            "spec:\n  predictor:\n{}    minReplicas: {}\n    maxReplicas: {}\n\
             \x20   terminationGracePeriodSeconds: {}\n\
             \x20   autoScaling:\n      metrics:\n        - type: External\n          external:\n\
             \x20           metric:\n              backend: prometheus\n              serverAddress: {}\n\
             \x20             query: {}\n            target:\n              type: Value\n              value: {}\n",
            self.isvc_model(),
            self.replicas,
            self.max_replicas,
            self.grace_seconds(),
            quote(&self.prometheus),
            quote(&self.query()),
            quote(&self.target_requests.to_string()),
        );
        s
    }

    /// Knative (serverless) mode, scaled on in-flight requests per replica.
    pub fn inference_service_knative(&self) -> String {
        let mut s = self.isvc_head(&[
            ("serving.kserve.io/deploymentMode", "Serverless".into()),
            ("autoscaling.knative.dev/metric", "concurrency".into()),
            (
                "autoscaling.knative.dev/target",
                self.target_requests.to_string(),
            ),
        ]);
        let _ = write!(
            s,
            "spec:\n  predictor:\n{}    minReplicas: {}\n    maxReplicas: {}\n\
             \x20   scaleMetric: concurrency\n    scaleTarget: {}\n    timeout: 600\n",
            self.isvc_model(),
            self.replicas,
            self.max_replicas,
            self.target_requests,
        );
        s
    }

    pub fn deployment(&self) -> String {
        let mut s = format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {0}\n  labels:\n    app.kubernetes.io/name: {0}\n\
             spec:\n  replicas: {1}\n  selector:\n    matchLabels:\n      app.kubernetes.io/name: {0}\n\
             \x20 template:\n    metadata:\n      labels:\n        app.kubernetes.io/name: {0}\n\
             \x20     annotations:\n        prometheus.io/scrape: \"true\"\n        prometheus.io/path: /metrics\n\
             \x20       prometheus.io/port: \"{PORT}\"\n\
             \x20   spec:\n      terminationGracePeriodSeconds: {2}\n\
             \x20     securityContext:\n        runAsNonRoot: true\n        runAsUser: 65532\n\
             \x20     initContainers:\n        - name: model\n          image: {3}\n\
             \x20         command: [\"sh\", \"-c\", \"cp -r /models/. /mnt/models/\"]\n\
             \x20         volumeMounts:\n            - name: model\n              mountPath: /mnt/models\n\
             \x20     containers:\n        - name: carrot\n          image: {4}\n",
            self.name,
            self.replicas,
            self.grace_seconds(),
            self.model_image,
            self.image,
        );
        s.push_str(&self.container_body(10, "/mnt/models"));
        s.push_str(
            "          volumeMounts:\n            - name: model\n              mountPath: /mnt/models\n              readOnly: true\n\
             \x20     volumes:\n        - name: model\n          emptyDir: {}\n",
        );
        s
    }

    pub fn service(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {0}\n  labels:\n    app.kubernetes.io/name: {0}\n\
             spec:\n  selector:\n    app.kubernetes.io/name: {0}\n  ports:\n    - name: http\n      port: 80\n\
             \x20     targetPort: http\n      protocol: TCP\n",
            self.name
        )
    }

    pub fn scaled_object(&self) -> String {
        format!(
            "apiVersion: keda.sh/v1alpha1\nkind: ScaledObject\nmetadata:\n  name: {0}\n\
             spec:\n  scaleTargetRef:\n    name: {0}\n  minReplicaCount: {1}\n  maxReplicaCount: {2}\n\
             \x20 triggers:\n    - type: prometheus\n      metadata:\n        serverAddress: {3}\n\
             \x20       query: {4}\n        threshold: {5}\n",
            self.name,
            self.replicas,
            self.max_replicas,
            quote(&self.prometheus),
            quote(&self.query()),
            quote(&self.target_requests.to_string()),
        )
    }

    pub fn readme(&self) -> String {
        format!(
            "# Deploying {name}\n\n\
             Written by `carrot deploy`. Replicas are identical and stateless; any load balancer in front\n\
             of them works. Each one needs the API key secret:\n\n\
             ```sh\nkubectl create secret generic {name}-api-key --from-literal=key=$(openssl rand -hex 24)\n```\n\n\
             Build and push the two images (podman or docker):\n\n\
             ```sh\npodman build -t {image} -f Containerfile .\n\
             podman build -t {model_image} -f Containerfile.model EXPORT_DIR\n\
             podman push {image} && podman push {model_image}\n```\n\n\
             ## KServe\n\n\
             Model cars must be enabled (`storageInitializer.enableModelcar: true` in the\n\
             `inferenceservice-config` ConfigMap). Then:\n\n\
             ```sh\nkubectl apply -f kserve/cluster-serving-runtime.yaml\n\
             kubectl apply -f kserve/inference-service.yaml          # Standard mode, KEDA on carrot_requests_*\n\
             # or: kubectl apply -f kserve/inference-service-knative.yaml   # Knative, concurrency {target}\n\
             kubectl get inferenceservice {name}\n```\n\n\
             ## Plain Kubernetes (with KEDA)\n\n\
             ```sh\nkubectl apply -f kubernetes/deployment.yaml -f kubernetes/service.yaml\n\
             kubectl apply -f kubernetes/scaled-object.yaml          # needs KEDA and Prometheus scraping the pods\n\
             kubectl port-forward service/{name} 8080:80\n\
             curl -H \"Authorization: Bearer $KEY\" localhost:8080/v1/chat/completions \\\n\
             \x20 -d '{{\"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'\n```\n\n\
             Pods are ready when `GET /ready` answers 200 (the graphs are loaded); `GET /health` is the\n\
             liveness probe. On SIGTERM a replica stops accepting and finishes its requests within {drain} s;\n\
             the termination grace period is {grace} s. The autoscaler adds a replica when the requests\n\
             waiting and running exceed {target} per replica (`{query}`).\n",
            name = self.name,
            image = self.image,
            model_image = self.model_image,
            target = self.target_requests,
            drain = self.drain_timeout,
            grace = self.grace_seconds(),
            query = self.query(),
        )
    }

    /// Every file but the build context, by relative path.
    pub fn files(&self) -> Vec<(&'static str, String)> {
        vec![
            ("Containerfile", self.containerfile()),
            ("Containerfile.model", self.containerfile_model()),
            (
                "kserve/cluster-serving-runtime.yaml",
                self.cluster_serving_runtime(),
            ),
            ("kserve/inference-service.yaml", self.inference_service()),
            (
                "kserve/inference-service-knative.yaml",
                self.inference_service_knative(),
            ),
            ("kubernetes/deployment.yaml", self.deployment()),
            ("kubernetes/service.yaml", self.service()),
            ("kubernetes/scaled-object.yaml", self.scaled_object()),
            ("README.md", self.readme()),
        ]
    }
}

/// A YAML double-quoted scalar.
fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("\"{s}\""))
}

/// A DNS-1123 name from a directory name: lower case, `-` for anything else, at most 63 bytes.
fn resource_name(raw: &str) -> String {
    let mut s: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    s = s.trim_matches('-').to_owned();
    s.truncate(63);
    let s = s.trim_end_matches('-').to_owned();
    if s.is_empty() { "carrot".to_owned() } else { s }
}

/// Check the flags and the export, then write everything under `args.out`.
pub fn run(args: &DeployArgs) -> anyhow::Result<()> {
    if !["cpu", "cuda", "tensorrt"].contains(&args.device.as_str()) {
        bail!("--device {}: expected cpu, cuda or tensorrt", args.device);
    }
    if args.replicas == 0 || args.max_replicas < args.replicas {
        bail!(
            "--replicas {} and --max-replicas {}: need 1 ≤ replicas ≤ max-replicas",
            args.replicas,
            args.max_replicas
        );
    }
    if args.target_requests == 0 {
        bail!("--target-requests must be at least 1");
    }
    if !(args.drain_timeout.is_finite() && args.drain_timeout >= 0.0) {
        bail!(
            "--drain-timeout {}: expected seconds ≥ 0",
            args.drain_timeout
        );
    }
    let manifest = Manifest::read_dir(&args.model)
        .with_context(|| format!("--model {}", args.model.display()))?;
    let dir_name = args
        .model
        .canonicalize()
        .unwrap_or_else(|_| args.model.clone())
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = resource_name(args.name.as_deref().unwrap_or(&dir_name));
    let estimate = carrot_runtime::memory::estimate(&args.model, &manifest);
    let memory_mib = (estimate.total() >> 20).max(256) + 256;
    let plan = Plan {
        model_image: args
            .model_image
            .clone()
            .unwrap_or_else(|| format!("carrot-model-{name}:latest")),
        name,
        device: args.device.clone(),
        replicas: args.replicas,
        max_replicas: args.max_replicas,
        target_requests: args.target_requests,
        image: args.image.clone(),
        prometheus: args.prometheus.clone(),
        drain_timeout: args.drain_timeout,
        memory_mib,
    };
    if args.out.exists() && !args.force {
        bail!(
            "--out {} already exists; pass --force to replace it",
            args.out.display()
        );
    }
    let ort = carrot_runtime::ort_lib::locate(args.ort_lib.as_deref())?;
    let tmp = args.out.with_file_name(format!(
        ".{}.partial-{}",
        args.out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "deploy".into()),
        std::process::id()
    ));
    let placed = write_all(&plan, &tmp, &ort.path).and_then(|()| {
        if args.out.exists() {
            std::fs::remove_dir_all(&args.out)
                .with_context(|| format!("replacing {}", args.out.display()))?;
        }
        std::fs::rename(&tmp, &args.out)
            .with_context(|| format!("moving the files to {}", args.out.display()))
    });
    if let Err(e) = placed {
        // Nothing half-written stays behind.
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    eprintln!(
        "wrote the deployment of {} ({}) to {}; next steps in {}",
        plan.name,
        args.device,
        args.out.display(),
        args.out.join("README.md").display()
    );
    Ok(())
}

fn write_all(plan: &Plan, dir: &Path, ort_lib: &Path) -> anyhow::Result<()> {
    for (rel, text) in plan.files() {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    let context = dir.join("context");
    let lib = context.join("lib");
    std::fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    let exe = std::env::current_exe().context("locating the carrot executable")?;
    std::fs::copy(&exe, context.join("carrot"))
        .with_context(|| format!("copying {}", exe.display()))?;
    std::fs::copy(ort_lib, lib.join("libonnxruntime.so"))
        .with_context(|| format!("copying {}", ort_lib.display()))?;
    if plan.gpu() {
        // The CUDA and TensorRT providers load from the directory of the main library.
        let from = ort_lib.parent().unwrap_or(Path::new("."));
        for entry in
            std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))?
        {
            let path = entry?.path();
            let file = path.file_name().map(|n| n.to_string_lossy().into_owned());
            if let Some(file) = file.filter(|f| f.starts_with("libonnxruntime_providers_")) {
                std::fs::copy(&path, lib.join(&file))
                    .with_context(|| format!("copying {}", path.display()))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_names_are_dns_labels() {
        assert_eq!(resource_name("Carrot_8B int4"), "carrot-8b-int4");
        assert_eq!(resource_name("--x--"), "x");
        assert_eq!(resource_name("…"), "carrot");
        assert_eq!(resource_name(&"a".repeat(80)).len(), 63);
    }
}
