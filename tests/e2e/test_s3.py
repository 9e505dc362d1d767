"""Storage on s3:// against a real S3 server on loopback (moto's server mode), and secrets.

A pipeline (the tiny one, its data beside it) is submitted from a "laptop" folder to a real
two-node Ray cluster whose
nodes reach the same S3 endpoint; the laptop's files are deleted the moment submit returns,
so the run can only succeed on what submit uploaded.

Every credential here is planted and unique: the Ray token, the AWS key pair (moto accepts
any) and the password of a real PostgreSQL registry. The client holds all of them; the
cluster's nodes hold their own copies (their environment), as a real cluster's instance
role and secrets would. Afterwards no byte of them may be found in what branchout wrote or
printed: run storage, logs, registry rows, CLI output, the Ray job's runtime_env.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time

import pgserver
import pytest
import sqlalchemy as sa
import yaml
from raycluster import LocalRayCluster, free_port

from conftest import TINY, run_cli

pytestmark = pytest.mark.slow

BUCKET = "branchout-test"
PLANTED = {
    "AWS_ACCESS_KEY_ID": "AKIA" + secrets.token_hex(8).upper(),
    "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30),
    "registry password": "pw-" + secrets.token_hex(12),
}


@pytest.fixture(scope="module")
def s3_env():
    port = free_port()
    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1",
                               "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": PLANTED["AWS_ACCESS_KEY_ID"], "AWS_SECRET_ACCESS_KEY": PLANTED["AWS_SECRET_ACCESS_KEY"],
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    deadline = time.time() + 30
    while True:
        try:
            boto3.client("s3").create_bucket(Bucket=BUCKET)
            break
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(0.3)
    yield env
    server.terminate()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def registry_url():
    """A PostgreSQL registry that requires the planted password."""
    with pgserver.postgres_server(password=PLANTED["registry password"]) as server:
        yield pgserver.create_database(server, "registry")


@pytest.fixture(scope="module")
def cluster(s3_env, registry_url, tmp_path_factory):
    # the nodes' own secrets: S3 keys (an instance role on a real cluster) and the registry
    # password for drivers, which receive the registry URL without it (PGPASSWORD, libpq's own)
    c = LocalRayCluster(tmp_path_factory.mktemp("s3cluster"),
                        extra_env={**s3_env, "PGPASSWORD": PLANTED["registry password"]}).start()
    yield c
    c.stop()


def _client_env(cluster, registry_url) -> dict[str, str]:
    return {**cluster.env(), "BRANCHOUT_REGISTRY": registry_url}


def _keys() -> list[str]:
    import boto3

    return [o["Key"] for page in boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
            for o in page.get("Contents", [])]


def _laptop(folder, corpus_dir):
    """A laptop's folder: the tiny pipeline (two ZeRO-2 pretrain workers, three domains, one of
    them LoRA) and its data beside it, named by relative paths."""
    data = folder / "data"
    data.mkdir(parents=True)
    spec = yaml.safe_load(yaml.safe_dump(TINY))
    for name in ("general", "legal", "code", "docs"):
        shutil.copy(corpus_dir / f"{name}.jsonl", data / f"{name}.jsonl")
    spec["pretrain"]["dataset"]["path"] = "data/general.jsonl"
    for d in spec["finetune"]["domains"]:
        d["dataset"]["path"] = f"data/{d['dataset']['path']}"
    spec["evaluate"].update(models=["base", "finetuned"])
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_pipeline_submitted_with_s3_storage_needs_no_client_and_leaks_no_secret(
        s3_env, cluster, registry_url, corpus_dir, tmp_path):
    import boto3
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from branchout.storage.checkpoint import fetch_verified

    env = _client_env(cluster, registry_url)
    printed = []

    # a pipeline submitted from a laptop folder that disappears at once; the driver runs on
    # the cluster and reads only what submit shipped to the run storage
    pipeline = _laptop(tmp_path / "laptop", corpus_dir)
    sets = ["--set", f"storage=s3://{BUCKET}/runs"]
    out = run_cli("submit", str(pipeline), "--address", cluster.address, *sets, env=env)
    printed.append(out.stdout + out.stderr)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    shutil.rmtree(pipeline.parent)
    run_id = next(x for x in out.stdout.splitlines() if x.startswith("submitted run ")).split()[2]
    assert "input pretrain.dataset.path:" in out.stdout and "input finetune.domains.2.dataset.path:" in out.stdout
    assert cluster.wait_for_job(run_id) == "SUCCEEDED", run_cli("logs", run_id, env=env).stdout[-3000:]
    shown = {}
    for args in (("status", run_id[:17]), ("list", "--pipeline", "tiny"), ("logs", run_id), ("lineage", run_id)):
        result = run_cli(*args, env=env)
        printed.append(result.stdout + result.stderr)
        assert result.returncode == 0, (args, result.stderr)
        shown[args[0]] = result.stdout
    # status by a prefix of the id, agreeing with Ray; every job listed
    assert "state succeeded" in shown["status"] and f"Ray job {run_id} (SUCCEEDED)" in shown["status"]
    for job in ("pretrain", "finetune/legal", "finetune/code", "finetune/docs", "evaluate/docs"):
        assert job in shown["status"]
    assert run_id in shown["list"] and "succeeded" in shown["list"] and "3/3" in shown["list"]
    theirs = subprocess.run(["ray", "job", "logs", run_id, "--address", cluster.address], env=cluster.env(),
                            capture_output=True, text=True).stdout
    assert f"run {run_id} → " in shown["logs"] and shown["logs"].strip() in theirs  # Ray's own job log
    again = run_cli("stop", run_id, env=env)
    assert again.returncode == 2 and f"run {run_id} already succeeded; nothing to stop" in again.stderr
    unknown = run_cli("status", "19990101-000000", env=env)
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == "error: no run matches '19990101-000000' (see `branchout list`)"

    keys = _keys()
    run_prefix = f"runs/tiny/{run_id}"
    for rel in ("spec.yaml", "state.json", "tokenizer/tokenizer.json", "pretrain/model/model.safetensors",
                "pretrain/model/MANIFEST.json", "finetune/legal/model/model.safetensors",
                "finetune/docs/model/adapter_model.safetensors", "eval/metrics.json", "report.html",
                "report.md", "logs/driver.log", "logs/pretrain.metrics.jsonl"):
        assert f"{run_prefix}/{rel}" in keys, rel
    assert f"{run_prefix}/pretrain/checkpoints/step_00000012/MANIFEST.rank1.json" in keys  # both ranks' shards
    uploaded = {k.rsplit("/", 1)[1] for k in keys if k.startswith("runs/inputs/sha256-")}
    assert {"general.jsonl", "legal.jsonl", "code.jsonl", "docs.jsonl", "MANIFEST.json"} <= uploaded
    ran = yaml.safe_load(s3_text(f"{run_prefix}/spec.yaml"))  # what the driver read: the shipped copies
    assert ran["pretrain"]["dataset"]["path"].startswith(f"s3://{BUCKET}/runs/inputs/sha256-")
    uri = f"s3://{BUCKET}/{run_prefix}"
    base = AutoModelForCausalLM.from_pretrained(fetch_verified(f"{uri}/pretrain/model", str(tmp_path / "base")))
    AutoModelForCausalLM.from_pretrained(fetch_verified(f"{uri}/finetune/legal/model", str(tmp_path / "legal")))
    PeftModel.from_pretrained(base, fetch_verified(f"{uri}/finetune/docs/model", str(tmp_path / "docs")))

    # everywhere a secret could have been written
    s3 = boto3.client("s3")
    stored = [s3.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in keys]
    engine = sa.create_engine(registry_url)
    with engine.connect() as conn:
        rows = [str(row) for table in sa.inspect(conn).get_table_names()
                for row in conn.execute(sa.text(f"SELECT * FROM {table}"))]
    engine.dispose()
    assert any(run_id in r for r in rows) and len({r for r in rows if "tiny" in r}) >= 2
    # in a child with the cluster's token: this test process has none (nor ~/.ray/auth_token on CI)
    job_env = subprocess.run(
        [sys.executable, "-c", "import json, sys; from ray.job_submission import JobSubmissionClient as C; "
         "print(json.dumps(C(sys.argv[1]).get_job_info(sys.argv[2]).runtime_env))", cluster.address, run_id],
        env=cluster.env(), capture_output=True, text=True, check=True).stdout
    ray_logs = subprocess.run(["ray", "job", "logs", run_id, "--address", cluster.address], env=cluster.env(),
                              capture_output=True, text=True).stdout
    places = {"run storage": b"\n".join(stored), "local files": _local_bytes(tmp_path),
              "registry rows": "\n".join(rows).encode(), "printed output": "\n".join(printed).encode(),
              "the job's runtime_env": job_env.encode(), "the job's log": ray_logs.encode()}
    assert b"BRANCHOUT_SPEC" in places["the job's runtime_env"]  # we are looking at the real thing
    for name, secret in {**PLANTED, "Ray token": cluster.token}.items():
        for place, haystack in places.items():
            assert secret.encode() not in haystack, f"{name} found in {place}"


def s3_text(key: str) -> str:
    import boto3

    return boto3.client("s3").get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()


def _local_bytes(root) -> bytes:
    return b"\n".join(p.read_bytes() for p in root.rglob("*") if p.is_file() and p.stat().st_size < 50 << 20)


def test_missing_bucket_is_one_line(s3_env, write_pipeline):
    path = write_pipeline(storage="s3://no-such-bucket-here/runs")
    out = run_cli("run", str(path), env=s3_env)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == \
        "error: storage: bucket 'no-such-bucket-here' does not exist (s3://no-such-bucket-here/runs)"
