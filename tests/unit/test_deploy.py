"""Deployment configs and manifests, checked without a cloud, a Kubernetes cluster or Docker.

- Launcher configs (deploy/aws, deploy/gcp): Ray's own schema and config preparation (what
  `ray up` does before touching the cloud); GPU types from zero, token auth, dashboard on
  localhost, a storage identity per node type that deploy/README.md creates, the token where
  Ray is pointed.
- KubeRay manifests: the real KubeRay v1.7.0 CRD schemas (tests/data/kuberay-crds/) made strict:
  wherever a schema declares `properties` (and does not preserve unknown fields) any other key
  is an error, at every depth, since the API server would prune it and a typo would deploy as
  a missing setting; types, enums, required fields too. CEL rules cannot run offline, so
  setting a field guarded by one fails. Plus the operator's own checks that a schema cannot
  express (ray-operator/controllers/ray/utils/validation.go), for the fields used here.
- The RayCluster through Ray's own KubeRay autoscaler translation; pod templates and plain
  Kubernetes objects against the Kubernetes OpenAPI schemas (kubernetes-validate, strict).
- Every Secret, ConfigMap and ServiceAccount a manifest uses is created, with the keys it
  reads, by a manifest or a README command before it is applied; token paths point into a
  mounted Secret; pods, and the image, run as non-root; .dockerignore ships no local state.
"""

from __future__ import annotations

import copy
import functools
import gzip
import json
import posixpath
import re
import zoneinfo
from collections.abc import Iterator

import pytest
import yaml

from conftest import REPO

DEPLOY = REPO / "deploy"
README = (DEPLOY / "README.md").read_text().replace("\\\n", " ")  # one command per line
CRDS = REPO / "tests" / "data" / "kuberay-crds"  # gzipped copies: a fresh clone needs nothing beside it
SHARED_CRDS = REPO.parent / "shared" / "kuberay-crds"  # the workplace's copy, where there is one
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayCronJob": "ray.io_raycronjobs.yaml"}
K8S_VERSION = "1.30.0"
IMAGE_HOME = "/home/ray"  # the image user's HOME (the Dockerfile test checks it is set)
TOKEN_SOURCE = "~/.ray/branchout_token"


def _load(rel: str) -> dict:
    return yaml.safe_load((DEPLOY / rel).read_text())


def _manifests() -> dict[str, dict]:
    """Every Kubernetes object under deploy/ (a YAML document with a `kind`), by file."""
    found = {}
    for path in sorted(DEPLOY.rglob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict) and "kind" in d]
        assert len(docs) <= 1, f"{path}: one object per file"
        if docs:
            found[path.relative_to(DEPLOY).as_posix()] = docs[0]
    return found


MANIFESTS = _manifests()
KUBERAY = sorted(rel for rel, obj in MANIFESTS.items() if obj["apiVersion"].startswith("ray.io/"))
PLAIN = sorted(set(MANIFESTS) - set(KUBERAY))


def _nodes(node, path: tuple = ()) -> Iterator[tuple[tuple, object]]:
    """(path, value) of `node` and of everything inside it."""
    yield path, node
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield from _nodes(value, (*path, key))


def _dotted(path) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text or "(root)"


def _pod_templates(obj: dict) -> Iterator[tuple[str, dict]]:
    """(path, PodTemplateSpec) of every pod template in a manifest."""
    for path, node in _nodes(obj):
        if isinstance(node, dict) and isinstance(node.get("spec"), dict) and "containers" in node["spec"]:
            yield _dotted(path), node


def _kubernetes_validate(obj: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def _pod(template: dict) -> dict:
    metadata = {"name": "pod", **template.get("metadata", {})}
    return {"apiVersion": "v1", "kind": "Pod", **template, "metadata": metadata}


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
    return sorted(f"{_dotted(e.absolute_path)}: {e.message}" for e in errors)


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
    _kubernetes_validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]})
    for _, template in _pod_templates(obj):
        _kubernetes_validate(_pod(template))


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
    _kubernetes_validate(MANIFESTS[rel])
    for _, template in _pod_templates(MANIFESTS[rel]):
        _kubernetes_validate(_pod(template))


# ---- what each manifest does ----

def test_raycluster():
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )
    from ray.autoscaler._private.util import validate_config

    cr = MANIFESTS["kuberay/raycluster.yaml"]
    spec = cr["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"] == {"mode": "token", "secretName": "branchout-ray-token"}
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"  # no LoadBalancer / NodePort dashboard
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] == 0 <= group["replicas"] <= group["maxReplicas"]
    for _, template in _pod_templates(cr):  # head and workers read and write run storage
        assert template["spec"]["serviceAccountName"] == "branchout"

    namespaced = copy.deepcopy(cr)
    namespaced["metadata"]["namespace"] = "default"  # the operator fills it in
    derived = _derive_autoscaling_config_from_ray_cr(namespaced)
    validate_config(derived)
    types = derived["available_node_types"]
    assert types["h100-pretrain"]["resources"]["GPU"] == 8 and types["l4-finetune"]["resources"]["GPU"] == 1
    assert types["h100-pretrain"]["min_workers"] == 0 and types["l4-finetune"]["max_workers"] == 12


def test_rayjob_and_raycronjob_run_the_pipeline_on_the_cluster():
    spec = MANIFESTS["kuberay/rayjob.yaml"]["spec"]
    assert spec["clusterSelector"] == {"ray.io/cluster": MANIFESTS["kuberay/raycluster.yaml"]["metadata"]["name"]}
    assert spec["entrypoint"].startswith("branchout run /pipelines/")
    assert spec["entrypointNumGpus"] == 0  # the driver never holds a GPU

    cron = MANIFESTS["kuberay/raycronjob.yaml"]
    plain = MANIFESTS["kuberay/cronjob.yaml"]
    assert cron["spec"]["jobTemplate"] == spec  # each run is exactly rayjob.yaml's RayJob
    assert (cron["spec"]["schedule"], cron["spec"]["timeZone"]) == (plain["spec"]["schedule"], plain["spec"]["timeZone"])
    assert cron["metadata"]["name"] != plain["metadata"]["name"]  # child Job names would collide
    gates = {g["name"]: g["enabled"] for g in _load("kuberay/operator-values.yaml")["featureGates"]}
    assert gates["RayCronJob"] is True  # alpha: off in the operator chart by default


def test_cronjob_submits_the_pipeline():
    cron = MANIFESTS["kuberay/cronjob.yaml"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"][:2] == ["branchout", "submit"] and "--wait" in container["command"]
    assert pod["serviceAccountName"] == "branchout"  # submit reads the pipeline's data first
    env = {e["name"]: e for e in container["env"]}
    assert "RAY_AUTH_TOKEN_PATH" in env and "RAY_AUTH_TOKEN" not in env  # the token comes from a Secret file
    # The pipeline file is the ConfigMap key that README's `--from-file=examples/...` makes.
    pipeline = container["command"][2]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[posixpath.dirname(pipeline)] == "pipelines"
    assert (REPO / "examples" / posixpath.basename(pipeline)).is_file()
    assert posixpath.basename(pipeline) in _created()[("ConfigMap", "branchout-pipelines")]
    token_volume = {v["name"]: v for v in pod["volumes"]}["ray-token"]
    assert token_volume["secret"]["secretName"] == MANIFESTS["kuberay/raycluster.yaml"]["spec"]["authOptions"]["secretName"]


# ---- references: everything a manifest uses is created, before it is applied ----

def _references(obj: dict) -> Iterator[tuple[str, str, str | None]]:
    """(kind, name, key or None) of every Secret, ConfigMap and ServiceAccount a manifest uses."""
    for path, node in _nodes(obj):
        field = path[-1] if path else None
        if field == "serviceAccountName":
            yield "ServiceAccount", node, None
        elif field == "secretName" and isinstance(node, str):  # a secret volume, or KubeRay's authOptions
            yield "Secret", node, "auth_token" if path[-2] == "authOptions" else None
        elif field in ("secretKeyRef", "secretRef"):
            yield "Secret", node["name"], node.get("key")
        elif field in ("configMap", "configMapKeyRef", "configMapRef"):
            yield "ConfigMap", node["name"], node.get("key")


@functools.cache
def _created() -> dict[tuple[str, str], frozenset[str]]:
    """(kind, name) -> keys of what the manifests in deploy/ and the commands in its README create."""
    made = {}
    for obj in MANIFESTS.values():
        if obj["kind"] in ("Secret", "ConfigMap", "ServiceAccount"):
            keys = {*obj.get("data", {}), *obj.get("stringData", {})}
            made[(obj["kind"], obj["metadata"]["name"])] = frozenset(keys)
    for kind, name, args in re.findall(r"kubectl create (secret generic|configmap) (\S+)(.*)", README):
        literal = re.findall(r"--from-literal=([^=\s]+)=", args)
        files = [key or posixpath.basename(path) for key, path in re.findall(r"--from-file=(?:([^=\s]+)=)?(\S+)", args)]
        made[("Secret" if kind.startswith("secret") else "ConfigMap", name)] = frozenset(literal + files)
    return made


def _applied_at(rel: str) -> int:
    command = f"kubectl apply -f deploy/{rel}"
    assert command in README, f"deploy/README.md never applies deploy/{rel}"
    return README.index(command)


def _created_at(kind: str, name: str) -> int:
    for rel, obj in MANIFESTS.items():
        if (obj["kind"], obj["metadata"]["name"]) == (kind, name):
            return _applied_at(rel)
    return README.index(f"kubectl create {'secret generic' if kind == 'Secret' else kind.lower()} {name} ")


@pytest.mark.parametrize("rel", sorted(MANIFESTS))
def test_what_a_manifest_uses_is_created_first(rel):
    created, applied = _created(), _applied_at(rel)
    for kind, name, key in _references(MANIFESTS[rel]):
        assert (kind, name) in created, f"{rel} uses {kind} {name}, which no manifest or README command creates"
        assert _created_at(kind, name) < applied, f"README creates {kind} {name} after applying {rel}"
        if key is not None and kind != "ServiceAccount":
            assert key in created[(kind, name)], f"{rel} reads key {key} of {kind} {name}, which has none"


def test_token_paths_point_into_mounted_secrets():
    checked = 0
    for rel, obj in MANIFESTS.items():
        for where, template in _pod_templates(obj):
            pod = template["spec"]
            assert pod.get("securityContext", {}).get("runAsNonRoot") is True, f"{rel} {where}"
            secrets = {v["name"]: v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
            for container in pod["containers"]:
                env = {e["name"]: e.get("value") for e in container.get("env", [])}
                if "RAY_AUTH_TOKEN_PATH" not in env:
                    continue
                directory, key = posixpath.split(env["RAY_AUTH_TOKEN_PATH"])
                volume = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}.get(directory)
                assert volume in secrets, f"{rel} {where}: {directory} is not a mounted Secret"
                assert key in _created()[("Secret", secrets[volume])], f"{rel} {where}: no key {key}"
                checked += 1
    assert checked  # the CronJob's submitter at least


# ---- Ray's cluster launcher ----

@pytest.mark.parametrize("rel", ["aws/cluster.yaml", "gcp/cluster.yaml"])
def test_cluster_launcher_config(rel):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _load(rel)
    validate_config(config)  # Ray's schema: raises on any unknown or mistyped field
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    types = prepared["available_node_types"]
    assert {"head", "h100_pretrain", "l4_finetune"} <= set(types)
    for name in ("h100_pretrain", "l4_finetune"):
        assert types[name]["min_workers"] == 0  # GPUs only while a pipeline needs them
    assert config["idle_timeout_minutes"] > 0
    head_start, worker_start = (" ".join(config[k]) for k in ("head_start_ray_commands", "worker_start_ray_commands"))
    assert "--dashboard-host=127.0.0.1" in head_start  # never a public Jobs API
    assert config["docker"]["image"].endswith("branchout:0.1.0")
    # The token: copied to the image user's default path, and Ray on every node pointed at it.
    (target,) = [dst for dst, src in config["file_mounts"].items() if src == TOKEN_SOURCE]
    assert target == f"{IMAGE_HOME}/.ray/auth_token" and f"> {TOKEN_SOURCE}" in README
    for start in (head_start, worker_start):
        assert f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={target} " in start


def test_aws_nodes_reach_storage_through_instance_profiles():
    types = _load("aws/cluster.yaml")["available_node_types"]
    profiles = {name: t["node_config"]["IamInstanceProfile"]["Name"] for name, t in types.items()}
    assert profiles["h100_pretrain"] == profiles["l4_finetune"] != profiles["head"]
    for profile in set(profiles.values()):  # README: the profile, its role, the storage policy
        assert f"create-instance-profile --instance-profile-name {profile}\n" in README
        assert f"add-role-to-instance-profile --instance-profile-name {profile} --role-name {profile}\n" in README
        assert re.search(rf"attach-role-policy --role-name {profile} --policy-arn \S+:policy/branchout-storage\n", README)
    # The head may hand the worker role to the instances it launches.
    passed = json.loads((DEPLOY / "aws/iam/pass-worker-role.json").read_text())["Statement"][0]
    assert passed["Action"] == "iam:PassRole" and passed["Resource"].endswith(f":role/{profiles['l4_finetune']}")
    assert f"put-role-policy --role-name {profiles['head']} " in README
    for path in sorted((DEPLOY / "aws" / "iam").glob("*.json")):
        json.loads(path.read_text())
        assert f"deploy/aws/iam/{path.name}" in README, f"README never uses {path.name}"


def test_gcp_workers_reach_storage_through_a_service_account():
    config = _load("gcp/cluster.yaml")
    created = set(re.findall(r"gcloud iam service-accounts create (\S+)", README))
    for name in ("h100_pretrain", "l4_finetune"):
        (account,) = config["available_node_types"][name]["node_config"]["serviceAccounts"]
        local, domain = account["email"].split("@")
        assert local in created and domain == f"{config['provider']['project_id']}.iam.gserviceaccount.com"
        assert re.search(rf"buckets add-iam-policy-binding \S+ --role=roles/storage\.\w+ +--member=serviceAccount:{local}@", README)


def test_pods_reach_storage_through_the_service_account():
    annotations = MANIFESTS["kuberay/serviceaccount.yaml"]["metadata"]["annotations"]
    gsa = annotations["iam.gke.io/gcp-service-account"].split("@")[0]
    assert f"gcloud iam service-accounts create {gsa} " in README
    assert re.search(rf"add-iam-policy-binding {gsa}@\S+ +--role=roles/iam.workloadIdentityUser "
                     r"--member=\"serviceAccount:\S+\[default/branchout\]\"", README)
    role = annotations["eks.amazonaws.com/role-arn"].rsplit("/", 1)[1]
    assert re.search(rf"eksctl create iamserviceaccount .*--name branchout +--role-name {role} ", README)


# ---- the image ----

def test_dockerfile_pins_the_stack_and_runs_as_non_root():
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.replace("\\\n", " ").splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    defaults = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    lines = [re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], ln) for ln in lines]
    assert re.fullmatch(r"FROM nvidia/cuda:\S+", lines[0])

    def first(needle: str) -> int:
        return next(i for i, ln in enumerate(lines) if needle in ln)

    for pin in ("torch==2.13.0", "ray[default,train]==2.60.0", "deepspeed==0.19.8", "transformers==5.24.0"):
        first(pin)
    assert first("torch==2.13.0") < first("deepspeed==") < first("pip install /opt/branchout")  # as the README does
    users = [ln.split()[1].split(":")[0] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1].isdigit() and users[-1] != "0"  # numeric: runAsNonRoot can verify it
    assert first(f"--uid {users[-1]} ") < first("USER ") and f"ENV HOME={IMAGE_HOME}" in lines


def test_dockerignore_ships_no_local_state():
    # docker-py (installed with moto[server]) implements Docker's own .dockerignore rules.
    from docker.utils.build import exclude_paths

    patterns = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    for state in (".venv", "runs", ".git", "data", "benchmarks/out", "**/*.egg-info", "**/__pycache__"):
        assert state in patterns  # also what this checkout does not hold yet
    shipped = exclude_paths(str(REPO), patterns, dockerfile="deploy/docker/Dockerfile")
    local = (".venv", "runs", ".git", "data", "benchmarks/out", ".pytest_cache", ".ruff_cache")
    for path in shipped:
        parts = path.split("/")
        assert parts[0] not in local and "/".join(parts[:2]) not in local, path
        assert "__pycache__" not in parts and not any(p.endswith(".egg-info") for p in parts), path
    assert {"pyproject.toml", "README.md", "__init__.py", "orchestrator/operate/jobs.py"} <= shipped
