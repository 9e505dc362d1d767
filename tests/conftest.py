"""Shared fixtures: real text corpora (built from this machine's files) and tiny pipelines."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))

# Tiny on purpose: 2 layers, 32 dims, fixed seeds; enough to learn, seconds to train.
TINY = {
    "name": "tiny",
    "tokenizer": {"vocab_size": 512},
    "model": {"type": "llama", "config": {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 128}},
    "pretrain": {
        "dataset": {"path": "general.jsonl"}, "seq_len": 32, "steps": 12,
        "global_batch_size": 8, "micro_batch_size": 2, "num_workers": 2,
        "resources_per_worker": {"cpu": 1}, "optimizer": {"lr": 3.0e-3},
        "schedule": {"warmup_steps": 2}, "checkpoint_every": 6, "log_every": 2,
        "deepspeed": {"zero_stage": 2, "precision": "fp32"}},
    "finetune": {
        "defaults": {"steps": 8, "global_batch_size": 4, "micro_batch_size": 4, "seq_len": 32,
                     "resources_per_worker": {"cpu": 0.5}, "schedule": {"warmup_steps": 1},
                     "checkpoint_every": 4, "log_every": 2, "optimizer": {"lr": 2.0e-3}},
        "domains": [
            {"name": "legal", "dataset": {"path": "legal.jsonl"}},
            {"name": "code", "dataset": {"path": "code.jsonl"}},
            {"name": "docs", "dataset": {"path": "docs.jsonl"}, "method": "lora",
             "lora": {"rank": 4, "alpha": 8}},
        ]},
    "evaluate": {"heldout_fraction": 0.2, "max_blocks": 16, "batch_size": 8},
}


@pytest.fixture(scope="session", autouse=True)
def isolated_registry(tmp_path_factory):
    """Tests (and the CLI processes they start) never touch the user's ~/.branchout registry."""
    url = f"sqlite:///{tmp_path_factory.mktemp('registry') / 'registry.db'}"
    old = os.environ.get("BRANCHOUT_REGISTRY")
    os.environ["BRANCHOUT_REGISTRY"] = url
    yield url
    if old is None:
        os.environ.pop("BRANCHOUT_REGISTRY", None)
    else:
        os.environ["BRANCHOUT_REGISTRY"] = old


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """Small real corpora (general/legal/code/docs JSONL) built by the quickstart's builder."""
    import corpus

    out = tmp_path_factory.mktemp("corpus")
    corpus.build(str(out), {"general": 150_000, "legal": 80_000, "code": 80_000, "docs": 80_000})
    return out


@pytest.fixture
def write_pipeline(corpus_dir, tmp_path):
    """Write a pipeline file next to the corpora: ``write_pipeline(**overrides) -> path``."""

    def write(spec: dict | None = None, name: str = "pipeline.yaml", **top) -> Path:
        data = copy.deepcopy(spec or TINY)
        data.update(top)
        data.setdefault("storage", str(tmp_path / "runs"))
        # point relative dataset paths at the corpora (tolerating specs a test has mangled)
        datasets = [(data.get("pretrain") or {}).get("dataset") if isinstance(data.get("pretrain"), dict) else None]
        finetune = data.get("finetune")
        if isinstance(finetune, dict) and isinstance(finetune.get("domains"), list):
            datasets += [d.get("dataset") for d in finetune["domains"] if isinstance(d, dict)]
        for ds in datasets:
            if isinstance(ds, dict) and isinstance(ds.get("path"), str) and not os.path.isabs(ds["path"]):
                ds["path"] = str(corpus_dir / ds["path"])
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write


def run_cli(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the installed ``branchout`` entry point exactly as a user would."""
    return subprocess.run(["branchout", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
