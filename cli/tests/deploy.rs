//! `carrot deploy` writes container files and Kubernetes / KServe resources that validate offline
//! (tests/python/check_deploy.py: kubernetes-validate --strict for built-in kinds, known fields for
//! the custom ones), with the probes, drain and GPU settings the server needs.

use std::path::{Path, PathBuf};
use std::process::Command;

fn carrot() -> Command {
    Command::new(env!("CARGO_BIN_EXE_carrot"))
}

/// The fixture exported once per process.
fn export_dir() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("deploy/carrot-tiny");
        carrot::demo::export_fixture(
            "carrot-tiny",
            &out,
            carrot_graphs::config::DType::F32,
            carrot_graphs::llama::Logits::Last,
            false,
        )
        .unwrap_or_else(|e| panic!("export: {e:#}"));
        out
    })
}

/// tests/python/check_deploy.py on `dir`: `Ok(report)` when every file validates, `Err(report)`
/// otherwise, `None` when Python is skipped (`CARROT_SKIP_PYTHON=1`).
fn run_check(dir: &Path) -> Option<Result<String, String>> {
    carrot_tests::run_python_script(
        "kubernetes_validate, yaml",
        "check_deploy.py",
        &[dir.as_os_str()],
    )
}

/// Every generated file validates.
fn check(dir: &Path) {
    if let Some(result) = run_check(dir) {
        let report = result.unwrap_or_else(|report| panic!("manifests do not validate:\n{report}"));
        assert_eq!(report.matches("ok ").count(), 6, "{report}");
    }
}

/// The validation is not a formality: a misspelt field in any of the generated kinds fails it.
#[test]
fn a_misspelt_field_fails_the_validation() {
    let tmp = tempfile::tempdir().expect("tmp");
    let good = tmp.path().join("good");
    assert!(deploy(&good, &[]).status.success());
    for (file, from, to) in [
        (
            "kubernetes/deployment.yaml",
            "readinessProbe",
            "readinesProbe",
        ),
        ("kserve/inference-service.yaml", "minReplicas", "minReplica"),
        (
            "kserve/cluster-serving-runtime.yaml",
            "supportedModelFormats",
            "supportedModelFormat",
        ),
        (
            "kubernetes/scaled-object.yaml",
            "maxReplicaCount",
            "maxReplicas",
        ),
    ] {
        let bad = tmp.path().join("bad");
        let _ = std::fs::remove_dir_all(&bad);
        std::fs::create_dir_all(bad.join("kserve")).expect("mkdir");
        std::fs::create_dir_all(bad.join("kubernetes")).expect("mkdir");
        let text = read(&good, file).replacen(from, to, 1);
        std::fs::write(bad.join(file), text).expect("write");
        let Some(result) = run_check(&bad) else {
            return;
        };
        match result {
            Err(report) => assert!(report.contains(to), "{file}: `{to}` not named:\n{report}"),
            Ok(report) => panic!("{file} with `{to}` passed:\n{report}"),
        }
    }
}

fn deploy(out: &Path, extra: &[&str]) -> std::process::Output {
    carrot()
        .args(["deploy", "--model"])
        .arg(export_dir())
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .expect("run carrot deploy")
}

fn read(dir: &Path, rel: &str) -> String {
    std::fs::read_to_string(dir.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

#[test]
fn cpu_and_gpu_deployments_validate_and_carry_probes_drain_and_resources() {
    let tmp = tempfile::tempdir().expect("tmp");
    for device in ["cpu", "cuda"] {
        let out = tmp.path().join(device);
        let run = deploy(
            &out,
            &[
                "--device",
                device,
                "--name",
                "Carrot Tiny",
                "--drain-timeout",
                "40",
            ],
        );
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        check(&out);
        let deployment = read(&out, "kubernetes/deployment.yaml");
        assert!(deployment.contains("name: carrot-tiny"), "{deployment}");
        assert!(deployment.contains("path: /ready") && deployment.contains("path: /health"));
        assert!(
            deployment.contains("terminationGracePeriodSeconds: 45"),
            "{deployment}"
        );
        assert!(
            deployment.contains("\"--drain-timeout\"\n            - \"40\""),
            "{deployment}"
        );
        assert_eq!(deployment.contains("nvidia.com/gpu"), device == "cuda");
        assert_eq!(deployment.contains("\"--device\""), device == "cuda");
        let isvc = read(&out, "kserve/inference-service.yaml");
        assert!(
            isvc.contains("autoscalerClass: \"keda\"") && isvc.contains("carrot_requests_running")
        );
        assert!(read(&out, "kubernetes/scaled-object.yaml").contains("carrot_requests_waiting"));
        assert!(read(&out, "Containerfile").contains(if device == "cuda" {
            "nvidia/cuda"
        } else {
            "debian"
        }));
        assert!(out.join("context/carrot").is_file());
        assert!(out.join("context/lib/libonnxruntime.so").is_file());
    }
}

#[test]
fn bad_arguments_are_one_line_errors_and_write_nothing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = tmp.path().join("d");
    for (args, needle) in [
        (vec!["--device", "tpu"], "--device tpu"),
        (
            vec!["--replicas", "3", "--max-replicas", "2"],
            "--replicas 3",
        ),
        (vec!["--drain-timeout=-1"], "--drain-timeout"),
    ] {
        let run = deploy(&out, &args);
        assert!(!run.status.success());
        let stderr = String::from_utf8_lossy(&run.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{stderr}");
        assert!(lines[0].contains(needle), "{stderr}");
        assert!(!out.exists());
    }
    std::fs::create_dir_all(&out).expect("mkdir");
    let run = deploy(&out, &[]);
    assert!(String::from_utf8_lossy(&run.stderr).contains("already exists"));
    let missing = carrot()
        .args(["deploy", "--model", "/nonexistent/export", "--out"])
        .arg(tmp.path().join("e"))
        .output()
        .expect("run");
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/export"));
}
