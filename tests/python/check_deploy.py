"""Validate the files `carrot deploy` writes, offline.

Usage:  python tests/python/check_deploy.py DEPLOY_DIR

Built-in kinds (Deployment, Service) are validated strictly against Kubernetes' own schemas with
kubernetes-validate (unknown fields fail). Custom resources (KServe's ClusterServingRuntime and
InferenceService, KEDA's ScaledObject) have no schema offline: their containers are validated
strictly as Kubernetes containers, and every other field must be one these kinds define (as in
the KServe v1beta1 / v1alpha1 and KEDA v1alpha1 API references). Prints one line per file and
exits 1 on the first failure.
"""

import glob
import os
import sys

import kubernetes_validate
import yaml

K8S = "1.33.0"

# Fields of the custom resources' specs that the generator may use (a subset of their APIs).
ISVC_PREDICTOR = {
    "model", "minReplicas", "maxReplicas", "autoScaling", "scaleMetric", "scaleTarget", "timeout",
    "containerConcurrency", "terminationGracePeriodSeconds", "serviceAccountName", "nodeSelector",
    "tolerations", "affinity",
}
ISVC_MODEL = {"modelFormat", "runtime", "storageUri", "args", "env", "resources", "protocolVersion"}
RUNTIME_SPEC = {"supportedModelFormats", "protocolVersions", "containers", "multiModel", "disabled"}
SCALED_OBJECT_SPEC = {
    "scaleTargetRef", "minReplicaCount", "maxReplicaCount", "triggers", "pollingInterval",
    "cooldownPeriod", "idleReplicaCount", "fallback", "advanced",
}
PROMETHEUS_TRIGGER = {"serverAddress", "query", "threshold", "activationThreshold", "namespace"}


def fail(path, msg):
    print(f"FAIL {path}: {msg}")
    sys.exit(1)


def only(path, where, obj, allowed):
    if not isinstance(obj, dict):
        fail(path, f"{where} is not a mapping")
    extra = sorted(set(obj) - allowed)
    if extra:
        fail(path, f"{where} has unknown fields {extra}")


def strict(path, resource):
    try:
        kubernetes_validate.validate(resource, K8S, strict=True)
    except kubernetes_validate.ValidationError as e:
        fail(path, f"{'.'.join(str(p) for p in e.path)}: {e.message}")


def as_pod(container):
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}, "spec": {"containers": [container]}}


def check(path):
    with open(path) as f:
        doc = yaml.safe_load(f)
    kind = doc.get("kind")
    if doc.get("apiVersion") in ("v1", "apps/v1"):
        strict(path, doc)
    elif kind == "ClusterServingRuntime":
        only(path, "spec", doc["spec"], RUNTIME_SPEC)
        for c in doc["spec"]["containers"]:
            strict(path, as_pod(c))
    elif kind == "InferenceService":
        only(path, "spec", doc["spec"], {"predictor"})
        only(path, "spec.predictor", doc["spec"]["predictor"], ISVC_PREDICTOR)
        only(path, "spec.predictor.model", doc["spec"]["predictor"]["model"], ISVC_MODEL)
        metrics = doc["spec"]["predictor"].get("autoScaling", {}).get("metrics", [])
        for m in metrics:
            only(path, "autoScaling.metrics[]", m, {"type", "external", "resource", "podmetric"})
            if m["type"] == "External":
                only(path, "external", m["external"], {"metric", "target"})
                only(path, "external.metric", m["external"]["metric"], {"backend", "serverAddress", "query", "namespace"})
                only(path, "external.target", m["external"]["target"], {"type", "value", "averageValue", "averageUtilization"})
    elif kind == "ScaledObject":
        only(path, "spec", doc["spec"], SCALED_OBJECT_SPEC)
        for t in doc["spec"]["triggers"]:
            only(path, "triggers[]", t, {"type", "metadata", "name", "authenticationRef", "metricType"})
            if t["type"] == "prometheus":
                only(path, "triggers[].metadata", t["metadata"], PROMETHEUS_TRIGGER)
    else:
        fail(path, f"unexpected kind {kind}")
    if not doc.get("metadata", {}).get("name"):
        fail(path, "metadata.name is missing")
    print(f"ok {os.path.relpath(path, sys.argv[1])}: {kind}")


def main():
    files = sorted(glob.glob(os.path.join(sys.argv[1], "**", "*.yaml"), recursive=True))
    if not files:
        fail(sys.argv[1], "no YAML files")
    for path in files:
        check(path)


if __name__ == "__main__":
    main()
