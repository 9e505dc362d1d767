"""The KubeRay manifests against the real KubeRay v1.7.0 CRD schemas, checked offline.

The schemas (tests/data/kuberay-crds/) are made strict: wherever a schema declares `properties`
(and does not preserve unknown fields) any other key is an error, at every depth, since the
API server would prune it and a typo would deploy as a missing setting; types, enums,
required fields too. CEL rules cannot run offline, so setting a field guarded by one fails.
Plus the operator's own checks that a schema cannot express
(ray-operator/controllers/ray/utils/validation.go), for the fields used here; and pod
templates and plain Kubernetes objects against the Kubernetes OpenAPI schemas
(kubernetes-validate, strict). What each manifest does is tests/unit/test_deploy.py.
"""

from __future__ import annotations

import copy
import functools
import gzip
import re
import zoneinfo

import pytest
import yaml
from deploy_manifests import (
    KUBERAY,
    MANIFESTS,
    PLAIN,
    dotted,
    kubernetes_validate,
    pod,
    pod_templates,
)

from conftest import REPO

CRDS = REPO / "tests" / "data" / "kuberay-crds"  # gzipped copies: a fresh clone needs nothing beside it
SHARED_CRDS = REPO.parent / "shared" / "kuberay-crds"  # the workplace's copy, where there is one
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayCronJob": "ray.io_raycronjobs.yaml"}


# ---- KubeRay CRD schemas, strict ----

def _strict(schema: dict) -> dict:
    """A copy of an OpenAPI schema in which every object that declares `properties` rejects any
    other key, unless it says x-kubernetes-preserve-unknown-fields: true."""
    out = dict(schema)
    if "properties" in schema:
        out["properties"] = {name: _strict(sub) for name, sub in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            out[key] = _strict(schema[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            out[key] = [_strict(sub) for sub in schema[key]]
    return out


def _openapi_validator():
    """Draft 7 plus the two OpenAPI/Kubernetes keywords that change a verdict here."""
    from jsonschema import Draft7Validator, ValidationError, validators

    def type_(validator, types, instance, schema):
        if instance is None and schema.get("nullable"):
            return
        yield from Draft7Validator.VALIDATORS["type"](validator, types, instance, schema)

    def cel(validator, rules, instance, schema):
        for rule in rules:  # transition rules (oldSelf) hold on create; others would go unchecked
            if "oldSelf" not in rule["rule"]:
                yield ValidationError(f"guarded by a CEL rule this test cannot evaluate: {rule['rule']}")

    return validators.extend(Draft7Validator, {"type": type_, "x-kubernetes-validations": cel})


def _crd_text(name: str) -> str:
    return gzip.decompress((CRDS / f"{name}.gz").read_bytes()).decode()


@pytest.mark.skipif(not SHARED_CRDS.is_dir(), reason="no ../shared/kuberay-crds beside this checkout")
@pytest.mark.parametrize("name", sorted(CRD_FILES.values()))
def test_vendored_crds_are_the_shared_ones(name):
    assert _crd_text(name) == (SHARED_CRDS / name).read_text(), f"tests/data/kuberay-crds/{name}.gz is stale"


@functools.cache
def _crd_validator(kind: str):
    crd = yaml.load(_crd_text(CRD_FILES[kind]), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1" and v["served"]]
    return _openapi_validator()(_strict(version["schema"]["openAPIV3Schema"]))


def crd_errors(obj: dict) -> list[str]:
    """Every way `obj` breaks its KubeRay v1.7.0 CRD schema, each as 'field.path: problem'."""
    if obj.get("apiVersion") != "ray.io/v1" or obj.get("kind") not in CRD_FILES:
        return [f"(root): not a KubeRay v1 kind: {obj.get('apiVersion')} {obj.get('kind')}"]
    errors = _crd_validator(obj["kind"]).iter_errors(obj)
    return sorted(f"{dotted(e.absolute_path)}: {e.message}" for e in errors)


def operator_errors(obj: dict) -> list[str]:
    """The KubeRay v1.7.0 operator's own rejections that its schema cannot express."""
    kind, name, spec = obj["kind"], obj["metadata"]["name"], obj["spec"]
    limit = {"RayCluster": 53, "RayJob": 47, "RayCronJob": 36}[kind]  # names of what they create
    errors = [f"metadata.name: longer than {limit}"] if len(name) > limit else []
    if kind == "RayCluster":
        errors += [f"spec.{e}" for e in _raycluster_errors(spec)]
    elif kind == "RayJob":
        errors += [f"spec.{e}" for e in _rayjob_errors(spec)]
    else:
        from croniter import croniter

        if "TZ" in spec["schedule"] or not croniter.is_valid(spec["schedule"]):
            errors.append(f"spec.schedule: not a standard cron schedule: {spec['schedule']!r}")
        try:
            zoneinfo.ZoneInfo(spec.get("timeZone", "UTC"))
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            errors.append(f"spec.timeZone: unknown time zone {spec['timeZone']!r}")
        errors += [f"spec.jobTemplate.{e}" for e in _rayjob_errors(spec["jobTemplate"])]
    return errors


def _rayjob_errors(spec: dict) -> list[str]:
    errors, shutdown = [], spec.get("shutdownAfterJobFinishes", False)
    if spec.get("suspend") and not shutdown:
        errors.append("suspend: needs shutdownAfterJobFinishes")
    if spec.get("ttlSecondsAfterFinished", 0) > 0 and not shutdown:
        errors.append("ttlSecondsAfterFinished: needs shutdownAfterJobFinishes")
    if selector := spec.get("clusterSelector"):
        if not selector.get("ray.io/cluster"):
            errors.append("clusterSelector: needs ray.io/cluster")
        if spec.get("suspend") or spec.get("submissionMode") == "SidecarMode":
            errors.append("clusterSelector: no suspend, no SidecarMode")
        if spec.get("backoffLimit", 0) > 0:
            errors.append("backoffLimit: incompatible with clusterSelector")
    elif "rayClusterSpec" not in spec:
        errors.append("one of rayClusterSpec or clusterSelector must be set")
    try:
        yaml.safe_load(spec.get("runtimeEnvYAML", ""))
    except yaml.YAMLError as e:
        errors.append(f"runtimeEnvYAML: {e}")
    if "rayClusterSpec" in spec:
        errors += [f"rayClusterSpec.{e}" for e in _raycluster_errors(spec["rayClusterSpec"])]
    return errors


def _raycluster_errors(spec: dict) -> list[str]:
    errors, auth = [], spec.get("authOptions", {})
    if auth.get("mode") == "token":
        version = tuple(int(p) for p in re.findall(r"\d+", spec.get("rayVersion", "0"))[:3])
        if version < (2, 52):
            errors.append("authOptions: token mode needs rayVersion >= 2.52.0")
        if auth.get("enableK8sTokenAuth") and auth.get("secretName"):
            errors.append("authOptions: enableK8sTokenAuth excludes secretName")
    elif auth.get("enableK8sTokenAuth"):
        errors.append("authOptions: enableK8sTokenAuth needs mode token")
    return errors


def test_kuberay_manifests_cover_every_kind():
    assert sorted(MANIFESTS[rel]["kind"] for rel in KUBERAY) == ["RayCluster", "RayCronJob", "RayJob"]


@pytest.mark.parametrize("rel", KUBERAY)
def test_kuberay_manifest_matches_crd(rel):
    obj = MANIFESTS[rel]
    assert crd_errors(obj) == []
    assert operator_errors(obj) == []
    # The CRD leaves metadata (ObjectMeta) to the API server: check it as Kubernetes does.
    kubernetes_validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]})
    for _, template in pod_templates(obj):
        kubernetes_validate(pod(template))


def _set(obj: dict, field: str, value) -> dict:
    """A copy of `obj` with `field` ('a.b.0.c') set to `value`, or deleted if `value` is DELETE."""
    obj = copy.deepcopy(obj)
    *parents, last = [int(p) if p.isdigit() else p for p in field.split(".")]
    node = functools.reduce(lambda n, p: n[p], parents, obj)
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return obj


DELETE = object()
HEAD_TYPO = _set(MANIFESTS["kuberay/raycluster.yaml"]["spec"], "headGroupSpec.rayStartParams", DELETE)
HEAD_TYPO["headGroupSpec"]["rayStartParam"] = {}
WORKER = "spec.workerGroupSpecs"
MUTATIONS = {  # what an operator might mistype -> (file, field, value, error at, error pattern)
    "cluster-spec-typo": ("kuberay/raycronjob.yaml", "spec.jobTemplate.rayClusterSpec", HEAD_TYPO,
                          "spec.jobTemplate.rayClusterSpec.headGroupSpec", "'rayStartParam'.* unexpected"),
    "spec-key-typo": ("kuberay/rayjob.yaml", "spec.entrypointNumGPUs", 0, "spec", "'entrypointNumGPUs'.* unexpected"),
    "cronjob-field": ("kuberay/raycronjob.yaml", "spec.concurrencyPolicy", "Forbid", "spec",
                      "'concurrencyPolicy'.* unexpected"),
    "top-level-key": ("kuberay/rayjob.yaml", "sepc", {}, "(root)", "'sepc'.* unexpected"),
    "pod-spec-typo": ("kuberay/raycluster.yaml", f"{WORKER}.0.template.spec.containers.0.volumeMount", [],
                      f"{WORKER}[0].template.spec.containers[0]", "'volumeMount'.* unexpected"),
    "enum": ("kuberay/raycluster.yaml", "spec.authOptions.mode", "Token", "spec.authOptions.mode", "is not one of"),
    "type": ("kuberay/raycluster.yaml", f"{WORKER}.1.maxReplicas", "12", f"{WORKER}[1].maxReplicas",
             "is not of type 'integer'"),
    "required": ("kuberay/raycluster.yaml", f"{WORKER}.0.groupName", DELETE, f"{WORKER}[0]",
                 "'groupName' is a required property"),
}


@pytest.mark.parametrize("case", sorted(MUTATIONS))
def test_crd_validation_rejects_mistakes(case):
    rel, field, value, where, pattern = MUTATIONS[case]
    errors = crd_errors(_set(MANIFESTS[rel], field, value))
    assert any(e.startswith(f"{where}: ") and re.search(pattern, e) for e in errors), errors


def test_strict_schema_keeps_preserved_objects_open():
    schema = _strict({"type": "object", "properties": {
        "closed": {"type": "object", "properties": {"a": {"type": "string"}}},
        "open": {"type": "object", "properties": {"a": {"type": "string"}},
                 "x-kubernetes-preserve-unknown-fields": True}}})
    validator = _openapi_validator()(schema)
    assert validator.is_valid({"closed": {"a": "x"}, "open": {"a": "x", "b": 1}})
    assert not validator.is_valid({"closed": {"a": "x", "b": 1}})


@pytest.mark.parametrize(("rel", "field", "value"), [
    ("kuberay/rayjob.yaml", "spec.ttlSecondsAfterFinished", 86400),
    ("kuberay/rayjob.yaml", "spec.backoffLimit", 2),
    ("kuberay/raycronjob.yaml", "spec.schedule", "CRON_TZ=UTC 0 3 * * 1"),
    ("kuberay/raycronjob.yaml", "spec.timeZone", "Europe/Nowhere"),
    ("kuberay/raycluster.yaml", "spec.rayVersion", "2.50.0"),
], ids=["ttl-without-shutdown", "backoff-with-selector", "tz-in-schedule", "time-zone", "auth-ray-version"])
def test_operator_rules_reject_mistakes(rel, field, value):
    obj = _set(MANIFESTS[rel], field, value)
    assert crd_errors(obj) == [] and operator_errors(obj)


@pytest.mark.parametrize("rel", PLAIN)
def test_kubernetes_manifest_is_valid(rel):
    kubernetes_validate(MANIFESTS[rel])
    for _, template in pod_templates(MANIFESTS[rel]):
        kubernetes_validate(pod(template))
