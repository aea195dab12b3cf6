"""Validate the files `carrot deploy` writes, offline.

Usage:  python tests/python/check_deploy.py DEPLOY_DIR

Built-in kinds (Deployment, Service) are validated strictly against Kubernetes' own schemas with
kubernetes-validate (unknown fields fail). KServe's ClusterServingRuntime and InferenceService are
walked field by field through the KServe Python SDK's API models (kserve==0.21.0, its models only:
tests/python/requirements-nodeps.txt): every field must exist in the model, with the model's type;
the Kubernetes types inside them (containers, …) are validated strictly with kubernetes-validate.
KEDA's ScaledObject, which has no schema offline, is checked against the fields of its v1alpha1
API. Prints one line per file and exits 1 on the first failure.
"""

import glob
import importlib.util
import os
import re
import sys
import types

import kubernetes_validate
import yaml

K8S = "1.33.0"



def kserve_models():
    """The SDK's `kserve.models` without running `kserve/__init__.py` (which needs the server stack)."""
    spec = importlib.util.find_spec("kserve")
    if spec is None:
        raise SystemExit("FAIL the KServe SDK is not installed (tests/python/requirements-nodeps.txt)")
    pkg = types.ModuleType("kserve")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["kserve"] = pkg
    import kserve.models as models  # noqa: E402

    return models


MODELS = kserve_models()

# Kubernetes types inside KServe resources, validated by wrapping them into a resource that holds one.
K8S_WRAPPERS = {
    "V1Container": lambda c: {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}, "spec": {"containers": [c]}},
    "V1ResourceRequirements": lambda r: {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"},
                                         "spec": {"containers": [{"name": "c", "image": "i", "resources": r}]}},
}
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


def strict(path, resource, where=""):
    try:
        kubernetes_validate.validate(resource, K8S, strict=True)
    except kubernetes_validate.ValidationError as e:
        fail(path, f"{where}{'.'.join(str(p) for p in e.path)}: {e.message}")


def walk(path, where, value, type_name):
    """`value` against the SDK type `type_name` (a model class name, list[...], dict(...) or a scalar)."""
    m = re.fullmatch(r"list\[(.+)\]", type_name)
    if m:
        if not isinstance(value, list):
            fail(path, f"{where} should be a list")
        for i, v in enumerate(value):
            walk(path, f"{where}[{i}]", v, m.group(1))
        return
    if type_name.startswith("dict("):
        if not isinstance(value, dict):
            fail(path, f"{where} should be a mapping")
        return
    scalars = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object}
    if type_name in scalars:
        if type_name == "str" and isinstance(value, (int, float)) and not isinstance(value, bool):
            fail(path, f"{where} should be a string")
        if not isinstance(value, scalars[type_name]):
            fail(path, f"{where} should be {type_name}, found {type(value).__name__}")
        return
    if type_name in K8S_WRAPPERS:
        strict(path, K8S_WRAPPERS[type_name](value), f"{where}: ")
        return
    cls = getattr(MODELS, type_name, None)
    if cls is None and type_name.startswith(("V1alpha", "V1beta")):
        # A KServe type the SDK leaves opaque (MetricQuantity: a number or a quantity string).
        if not isinstance(value, (str, int, float)):
            fail(path, f"{where} should be a number or a quantity ({type_name})")
        return
    if cls is None:
        # Another Kubernetes type (metadata, tolerations, …): a mapping is all that is checked.
        if not isinstance(value, dict):
            fail(path, f"{where} should be a mapping ({type_name})")
        return
    if not isinstance(value, dict):
        fail(path, f"{where} should be a mapping ({type_name})")
    by_json = {json: attr for attr, json in cls.attribute_map.items()}
    for key, v in value.items():
        if key not in by_json:
            fail(path, f"{where}.{key}: no such field in {type_name}")
        walk(path, f"{where}.{key}", v, cls.openapi_types[by_json[key]])


def check(path):
    with open(path) as f:
        doc = yaml.safe_load(f)
    kind = doc.get("kind")
    if doc.get("apiVersion") in ("v1", "apps/v1"):
        strict(path, doc)
    elif kind == "ClusterServingRuntime":
        walk(path, "", doc, "V1alpha1ClusterServingRuntime")
    elif kind == "InferenceService":
        walk(path, "", doc, "V1beta1InferenceService")
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
