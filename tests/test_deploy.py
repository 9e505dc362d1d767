"""Deployment manifests, checked without a cloud or a Kubernetes cluster.

What is checked, and how:
- Ray cluster-launcher configs (deploy/aws, deploy/gcp): Ray's own JSON schema
  (ray/autoscaler/ray-schema.json, via ``validate_config``) and Ray's own config
  preparation (``prepare_config``, what `ray up` does before touching the cloud), plus
  branchout's requirements: GPU types scale from zero, token auth on, dashboard on localhost.
- KubeRay RayCluster: translated by Ray's own KubeRay autoscaler code
  (``_derive_autoscaling_config_from_ray_cr``, what the in-tree autoscaler runs) and the
  result validated against ray-schema.json; every pod template validated (strict, no
  unknown fields) against the Kubernetes 1.30 OpenAPI schemas by ``kubernetes-validate``.
- RayJob / RayCluster CRD fields: the KubeRay CRD OpenAPI schemas are not available
  offline (no package ships them), so a hand-written subset is checked instead: only
  fields the v1 CRDs define, their types, and the required ones. Not checked: field
  constraints of the CRDs beyond that subset.
- The Kubernetes CronJob: validated whole (batch/v1) against the Kubernetes schemas.
- The Dockerfile pins every version the project is tested with.
"""

from __future__ import annotations

import copy
import re

import pytest
import yaml

from conftest import REPO

pytestmark = pytest.mark.unit

DEPLOY = REPO / "deploy"
K8S_VERSION = "1.30.0"


def _load(rel: str) -> dict:
    return yaml.safe_load((DEPLOY / rel).read_text())


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
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start  # never a public Jobs API
    assert "RAY_AUTH_MODE=token" in head_start and "RAY_AUTH_MODE=token" in " ".join(config["worker_start_ray_commands"])
    assert config["docker"]["image"].endswith("branchout:0.1.0")


def _kubernetes_validate(obj: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def _pod(template: dict, name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, **template}


RAYCLUSTER_SPEC = {"rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec",
                   "workerGroupSpecs", "authOptions", "suspend", "managedBy", "headServiceAnnotations",
                   "gcsFaultToleranceOptions"}
HEAD_GROUP = {"serviceType", "headService", "enableIngress", "rayStartParams", "template", "resources"}
WORKER_GROUP = {"groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds", "suspend",
                "rayStartParams", "template", "scaleStrategy", "numOfHosts", "resources"}
AUTOSCALER = {"resources", "image", "imagePullPolicy", "env", "envFrom", "upscalingMode", "version",
              "idleTimeoutSeconds", "securityContext", "volumeMounts"}
RAYJOB_SPEC = {"entrypoint", "runtimeEnvYAML", "rayClusterSpec", "clusterSelector", "shutdownAfterJobFinishes",
               "ttlSecondsAfterFinished", "backoffLimit", "submissionMode", "submitterPodTemplate",
               "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "activeDeadlineSeconds",
               "suspend", "jobId", "metadata", "managedBy", "submitterConfig", "deletionStrategy"}


def test_raycluster():
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )
    from ray.autoscaler._private.util import validate_config

    cr = _load("kuberay/raycluster.yaml")
    assert cr["apiVersion"] == "ray.io/v1" and cr["kind"] == "RayCluster" and cr["metadata"]["name"]
    spec = cr["spec"]
    assert set(spec) <= RAYCLUSTER_SPEC and set(spec["headGroupSpec"]) <= HEAD_GROUP
    assert set(spec["autoscalerOptions"]) <= AUTOSCALER
    assert spec["enableInTreeAutoscaling"] is True and spec["authOptions"] == {"mode": "token"}
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"  # no LoadBalancer / NodePort dashboard
    for group in spec["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP and {"groupName", "template", "rayStartParams"} <= set(group)
        assert group["minReplicas"] == 0 <= group["replicas"] <= group["maxReplicas"]

    namespaced = copy.deepcopy(cr)
    namespaced["metadata"]["namespace"] = "default"  # the operator fills it in
    derived = _derive_autoscaling_config_from_ray_cr(namespaced)
    validate_config(derived)
    types = derived["available_node_types"]
    assert types["h100-pretrain"]["resources"]["GPU"] == 8 and types["l4-finetune"]["resources"]["GPU"] == 1
    assert types["h100-pretrain"]["min_workers"] == 0 and types["l4-finetune"]["max_workers"] == 12

    _kubernetes_validate(_pod(spec["headGroupSpec"]["template"], "head"))
    for group in spec["workerGroupSpecs"]:
        _kubernetes_validate(_pod(group["template"], group["groupName"]))


def test_rayjob():
    job = _load("kuberay/rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC and "entrypoint" in spec
    assert spec["clusterSelector"] == {"ray.io/cluster": "branchout"}
    assert spec["entrypoint"].startswith("branchout run /pipelines/")
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    assert spec["entrypointNumGpus"] == 0  # the driver never holds a GPU
    _kubernetes_validate(_pod(spec["submitterPodTemplate"], "submitter"))


def test_cronjob_submits_the_pipeline():
    cron = _load("kuberay/cronjob.yaml")
    _kubernetes_validate(cron)
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:2] == ["branchout", "submit"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    env = {e["name"]: e for e in container["env"]}
    assert "RAY_AUTH_TOKEN_PATH" in env and "RAY_AUTH_TOKEN" not in env  # the token comes from a Secret file


def test_dockerfile_pins_the_tested_stack():
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+$", text, re.M)
    for pin in ("torch==2.13.0", "ray[default,train]==2.60.0", "deepspeed==0.19.8", "transformers==5.24.0"):
        assert pin in text
    assert "pip install /opt/branchout" in text
