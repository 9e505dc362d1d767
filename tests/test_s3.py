"""A pipeline whose storage is s3:// against a real S3 server on loopback (moto's server mode)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from raycluster import free_port

from conftest import run_cli

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BUCKET = "branchout-test"


@pytest.fixture(scope="module")
def s3_env():
    port = free_port()
    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1",
                               "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
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


def test_pipeline_on_s3_storage_end_to_end(s3_env, write_pipeline, tmp_path):
    import boto3
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from branchout.stages.checkpoint import fetch_verified

    path = write_pipeline(storage=f"s3://{BUCKET}/runs")
    out = run_cli("run", str(path), "--set", "evaluate.models=[base,finetuned]", env=s3_env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    keys = [o["Key"] for page in boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
            for o in page.get("Contents", [])]
    run_prefix = next(k for k in keys if k.endswith("/state.json")).rsplit("/", 1)[0]
    for rel in ("spec.yaml", "tokenizer/tokenizer.json", "pretrain/model/model.safetensors",
                "pretrain/model/MANIFEST.json", "finetune/legal/model/model.safetensors",
                "finetune/docs/model/adapter_model.safetensors", "eval/metrics.json", "report.html",
                "report.md", "logs/driver.log", "logs/pretrain.metrics.jsonl"):
        assert f"{run_prefix}/{rel}" in keys, rel
    assert any(k.startswith(f"{run_prefix}/pretrain/ray/") for k in keys)  # Ray Train's checkpoints
    assert any(k.startswith("runs/cache/data/") and k.endswith("train.bin") for k in keys)
    assert not list(tmp_path.glob("**/model.safetensors"))  # nothing landed on local disk instead

    uri = f"s3://{BUCKET}/{run_prefix}"
    base = AutoModelForCausalLM.from_pretrained(fetch_verified(f"{uri}/pretrain/model", str(tmp_path / "base")))
    AutoModelForCausalLM.from_pretrained(fetch_verified(f"{uri}/finetune/legal/model", str(tmp_path / "legal")))
    PeftModel.from_pretrained(base, fetch_verified(f"{uri}/finetune/docs/model", str(tmp_path / "docs")))


def test_missing_bucket_is_one_line(s3_env, write_pipeline):
    path = write_pipeline(storage="s3://no-such-bucket-here/runs")
    out = run_cli("run", str(path), env=s3_env)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == \
        "error: storage: bucket 'no-such-bucket-here' does not exist (s3://no-such-bucket-here/runs)"
