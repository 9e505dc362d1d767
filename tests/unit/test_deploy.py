"""Deployment configs and manifests, checked without a cloud, a Kubernetes cluster or Docker.

- Launcher configs (deploy/aws, deploy/gcp): Ray's own schema and config preparation (what
  `ray up` does before touching the cloud); GPU types from zero, token auth, dashboard on
  localhost, a storage identity per node type that deploy/README.md creates, the token where
  Ray is pointed.
- KubeRay manifests: what each one does, and the RayCluster through Ray's own KubeRay
  autoscaler translation. (Their schemas: tests/unit/test_kuberay_schemas.py.)
- Every Secret, ConfigMap and ServiceAccount a manifest uses is created, with the keys it
  reads, by a manifest or a README command before it is applied; token paths point into a
  mounted Secret; pods, and the image, run as non-root; .dockerignore ships no local state.
"""

from __future__ import annotations

import copy
import functools
import json
import posixpath
import re
from collections.abc import Iterator

import pytest
from deploy_manifests import (
    DEPLOY,
    MANIFESTS,
    README,
    load,
    nodes,
    pod_templates,
)

from conftest import REPO

IMAGE_HOME = "/home/ray"  # the image user's HOME (the Dockerfile test checks it is set)
TOKEN_SOURCE = "~/.ray/branchout_token"


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
    # head and workers read and write run storage; only the head holds the autoscaler's Role
    accounts = {where.split(".")[1].split("[")[0]: t["spec"]["serviceAccountName"] for where, t in pod_templates(cr)}
    assert accounts == {"headGroupSpec": "branchout", "workerGroupSpecs": "branchout-worker"}

    namespaced = copy.deepcopy(cr)
    namespaced["metadata"]["namespace"] = "default"  # the operator fills it in
    derived = _derive_autoscaling_config_from_ray_cr(namespaced)
    validate_config(derived)
    types = derived["available_node_types"]
    assert types["h100-pretrain"]["resources"]["GPU"] == 8 and types["l4-finetune"]["resources"]["GPU"] == 1
    assert types["h100-pretrain"]["min_workers"] == 0 and types["l4-finetune"]["max_workers"] == 12


def test_a_deleted_worker_pod_drains_its_node_as_preempted_within_its_grace():
    """Spot reclaim or scale-down: the preStop hook (branchout.cluster.drain, exercised against a
    real cluster in tests/integration/test_preemption.py) runs inside the grace period."""
    from branchout.cluster import drain

    for group in MANIFESTS["kuberay/raycluster.yaml"]["spec"]["workerGroupSpecs"]:
        pod_spec = group["template"]["spec"]
        [container] = pod_spec["containers"]
        command = container["lifecycle"]["preStop"]["exec"]["command"]
        assert command[:3] == ["python", "-m", "branchout.cluster.drain"], group["groupName"]
        args = drain.parse(command[3:])  # the hook accepts what the manifest passes
        # the hook's wait ends before the kubelet's SIGKILL, with room for the drain call itself
        assert args.grace + 5 <= pod_spec["terminationGracePeriodSeconds"], group["groupName"]
        assert args.address == "auto" and args.node_id is None  # this pod's own node


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
    gates = {g["name"]: g["enabled"] for g in load("kuberay/operator-values.yaml")["featureGates"]}
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
    for path, node in nodes(obj):
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
        for where, template in pod_templates(obj):
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


# ---- Pod Security, identities, network ----

def _restricted_problems(pod: dict) -> list[str]:
    """What keeps a pod spec from Kubernetes' "restricted" Pod Security Standard (v1.30)."""
    problems = []
    ctx = pod.get("securityContext", {})
    if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
        problems.append("host namespaces")
    allowed = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected",
               "secret"}
    problems += [f"volume {v['name']}: {kind}" for v in pod.get("volumes", []) for kind in set(v) - {"name"}
                 if kind not in allowed]
    for c in pod["containers"] + pod.get("initContainers", []):
        cc = c.get("securityContext", {})
        if cc.get("runAsNonRoot", ctx.get("runAsNonRoot")) is not True:
            problems.append(f"{c['name']}: runAsNonRoot")
        if (cc.get("runAsUser", ctx.get("runAsUser")) or 1) == 0:
            problems.append(f"{c['name']}: runAsUser 0")
        if cc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{c['name']}: allowPrivilegeEscalation")
        if cc.get("privileged"):
            problems.append(f"{c['name']}: privileged")
        caps = cc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []) or set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{c['name']}: capabilities")
        seccomp = cc.get("seccompProfile", ctx.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{c['name']}: seccompProfile")
    return problems


def test_every_pod_meets_the_restricted_pod_security_level():
    checked = 0
    for rel, obj in MANIFESTS.items():
        for where, template in pod_templates(obj):
            assert _restricted_problems(template["spec"]) == [], f"{rel} {where}"
            checked += 1
    assert checked >= 6  # head, 2 worker groups, the CronJob's pod, 2 RayJob submitters
    assert _restricted_problems({"containers": [{"name": "c"}]})  # the check can fail


def test_no_password_is_an_environment_variable():
    for rel, obj in MANIFESTS.items():
        for where, template in pod_templates(obj):
            for c in template["spec"]["containers"]:
                names = [e["name"] for e in c.get("env", [])]
                assert not [n for n in names if "PASSWORD" in n and not n.endswith("_FILE")], f"{rel} {where}"


def test_the_network_policy_selects_the_ray_pods_and_lets_branchouts_pods_in():
    policy = MANIFESTS["kuberay/networkpolicy.yaml"]["spec"]
    name = MANIFESTS["kuberay/raycluster.yaml"]["metadata"]["name"]
    assert policy["podSelector"] == {"matchLabels": {"ray.io/cluster": name}} and policy["policyTypes"] == ["Ingress"]
    allowed = [peer["podSelector"]["matchLabels"] for rule in policy["ingress"] for peer in rule["from"]]
    assert {"ray.io/cluster": name} in allowed and {"app.kubernetes.io/name": "kuberay-operator"} in allowed
    for rel in ("kuberay/cronjob.yaml", "kuberay/rayjob.yaml", "kuberay/raycronjob.yaml"):  # submitters
        (template,) = [t for _, t in pod_templates(MANIFESTS[rel])]
        labels = template.get("metadata", {}).get("labels", {})
        assert any(all(labels.get(k) == v for k, v in peer.items()) for peer in allowed), rel


# ---- Ray's cluster launcher ----

@pytest.mark.parametrize("rel", ["aws/cluster.yaml", "gcp/cluster.yaml"])
def test_cluster_launcher_config(rel):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(rel)
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


def test_aws_nodes_require_imdsv2():
    """A container on a node must not read the instance role's keys with one plain GET (issue 32)."""
    config = load("aws/cluster.yaml")
    for name, node_type in config["available_node_types"].items():
        options = node_type["node_config"].get("MetadataOptions", {})
        assert options.get("HttpTokens") == "required" and options.get("HttpPutResponseHopLimit", 1) <= 2, name


def test_aws_nodes_reach_storage_through_instance_profiles():
    types = load("aws/cluster.yaml")["available_node_types"]
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
    config = load("gcp/cluster.yaml")
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
