"""A pretraining mixture as the pretrain's worker trains it (``stages.training.recipe.train``):
two packed corpora at weights 0.8/0.2, the blocks it read counted per source, and a worker
SIGKILLed mid-pretrain that resumes to exactly the weights of an uninterrupted run."""

from __future__ import annotations

import json
import pickle
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import TINY, job_parts

STEPS, BATCH = 8, 10


@pytest.fixture(scope="module")
def parts(corpus_dir, tmp_path_factory):
    """(root, {source: packed data uri}): the legal corpus of ``job_parts`` and the general one."""
    from branchout.core.spec import DatasetSpec
    from branchout.stages.job import DataJob
    from branchout.stages.prepare.data import prepare
    from branchout.stages.prepare.tokenizer import tokenizer_hash

    root, legal, _ = job_parts(tmp_path_factory.mktemp("mixture"), corpus_dir)
    tok = str(root / "tokenizer")
    general = prepare(DataJob(dataset=DatasetSpec(path=str(corpus_dir / "general.jsonl")), tokenizer_uri=tok,
                              tokenizer_hash=tokenizer_hash(tok), seq_len=32, heldout_fraction=0.2, split_seed=0,
                              cache_root=str(root / "cache")))
    return root, {"pretrain/general": general.uri, "pretrain/legal": legal}


def _job(parts, out: str):
    from branchout.core.spec import PretrainSpec
    from branchout.stages.job import TrainJob

    root, uris = parts
    weights = {"pretrain/general": 0.8, "pretrain/legal": 0.2}
    t = PretrainSpec(datasets=[{"name": k.split("/")[1], "path": "unused", "weight": w} for k, w in weights.items()],
                     steps=STEPS, seq_len=32, global_batch_size=BATCH, micro_batch_size=5, checkpoint_every=4,
                     log_every=4, optimizer={"lr": 3e-3}, schedule={"warmup_steps": 2},
                     deepspeed={"precision": "fp32"})
    return TrainJob(name="pretrain", kind="pretrain", training=t, steps=STEPS, model_type="llama",
                    model_overrides=TINY["model"]["config"], tokenizer_uri=str(root / "tokenizer"),
                    data_uri=uris["pretrain/general"], out_uri=str(root / out), logs_uri=str(root / "logs"),
                    run_id="test", mixture=tuple((k, uris[k], w) for k, w in weights.items()))


def _train_in_subprocess(job, env: dict | None = None) -> subprocess.CompletedProcess:
    """``train(job)`` in its own process (so a planned fault can SIGKILL it)."""
    import os

    path = f"{job.out_uri}.job.pkl"
    with open(path, "wb") as f:
        pickle.dump(job, f)
    script = ("import pickle, sys; from branchout.stages.training.recipe import train; "
              "train(pickle.load(open(sys.argv[1], 'rb')))")
    return subprocess.run([sys.executable, "-c", script, path], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def _weights(model_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def test_the_pretrain_reads_its_sources_by_weight_and_resumes_exactly(parts):
    import torch

    from branchout.stages.training.mixture import source_counts
    from branchout.stages.training.recipe import train

    torch.manual_seed(0)
    torch.set_num_threads(1)
    whole = train(_job(parts, "whole"))
    # counted as read: 80 blocks at 0.8/0.2, exactly (the interleaving is exact at every prefix)
    assert whole["mixture_blocks"] == {"pretrain/general": 64, "pretrain/legal": 16}
    assert source_counts(np.array([0.8, 0.2]), np.array([STEPS * BATCH]))[:, 0].tolist() == [64, 16]

    killed = _train_in_subprocess(_job(parts, "killed"), {"BRANCHOUT_FAULTS": "pretrain@6"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = _train_in_subprocess(_job(parts, "killed"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    root = parts[0]
    result = json.loads((root / "killed" / "result.json").read_text())
    assert result["first_step"] == 4  # from its step-4 checkpoint
    assert result["mixture_blocks"] == {"pretrain/general": 32, "pretrain/legal": 8}  # steps 5-8 only
    assert result["final_loss"] == pytest.approx(whole["final_loss"], rel=1e-6)
    a, b = _weights(root / "whole" / "model"), _weights(root / "killed" / "model")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a), \
        [k for k in a if not torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7)]


def test_a_fine_tune_replays_its_share_of_the_pretraining_text(parts):
    """``finetune.replay: 0.25``: a quarter of every stretch of blocks is the general corpus's."""
    from dataclasses import replace

    from branchout.stages.training.recipe import train

    from conftest import job_for

    root, uris = parts
    job = job_for((root, uris["pretrain/legal"], TINY["model"]["config"]), "replayed", "full", steps=8,
                  global_batch_size=4, replay=0.25)
    result = train(replace(job, replay=(("pretrain", uris["pretrain/general"], 0.25),)))
    assert result["mixture_blocks"] == {"finetune/replayed": 24, "pretrain": 8}  # 32 blocks, 3:1
