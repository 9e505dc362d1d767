"""Held-out loss while a fine-tune trains (``eval_every``), the best checkpoint exported
(``keep_best``) and early stopping, on the real single-worker training path.

The learning rate warms up for longer than the run, to a rate far too high for this model
(10 × step/160, no clipping: 3.0 by the last step): the held-out loss falls, then climbs as the
rate overshoots, so the best step is not the last.
"""

from __future__ import annotations

import json

import pytest

from conftest import job_for, job_parts

STEPS, EVERY = 48, 4
OVERSHOOT = dict(steps=STEPS, eval_every=EVERY, eval_blocks=16, checkpoint_every=100, keep_checkpoints=1,
                 schedule={"warmup_steps": 160, "min_lr_ratio": 1.0}, optimizer={"lr": 10.0, "grad_clip": 0.0})


@pytest.fixture(scope="module")
def parts(corpus_dir, tmp_path_factory):
    return job_parts(tmp_path_factory.mktemp("eval-during"), corpus_dir)


def _curve(parts, job) -> dict[int, float]:
    path = parts[0] / "logs" / f"{job.slug}.metrics.jsonl"
    return {r["step"]: r["eval_loss"] for r in map(json.loads, path.read_text().splitlines()) if "eval_loss" in r}


def _heldout_loss(parts, job, model_dir) -> float:
    """The scorer's loss of the model in ``model_dir`` (what the run scored at its best step)."""
    import torch
    from transformers import AutoModelForCausalLM

    from branchout.stages.training.engine import TorchEngine
    from branchout.stages.training.recipe import heldout_scorer

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    return heldout_scorer(job, job.training, 0, 1)(TorchEngine(model, job.training, 1))["eval_loss"]


def test_keep_best_exports_the_best_scored_step_not_the_last(parts):
    from branchout.stages.training.recipe import train

    job = job_for(parts, "best", "full", **OVERSHOOT)
    result = train(job)
    curve = _curve(parts, job)
    assert sorted(curve) == list(range(EVERY, STEPS + 1, EVERY))  # the held-out curve, every 4 steps
    best = min(curve, key=curve.get)
    assert best < STEPS and curve[STEPS] > curve[best] * 1.05, curve  # it overshoots late
    assert (result["best_step"], result["exported_step"]) == (best, best)
    assert result["best_eval_loss"] == pytest.approx(curve[best])
    # the exported model is that step's: it scores what the run scored there, not the last step
    assert _heldout_loss(parts, job, parts[0] / "best" / "model") == pytest.approx(curve[best], rel=1e-5)
    # the best checkpoint outlived keep_checkpoints: 1
    assert f"step_{best:08d}" in {p.name for p in (parts[0] / "best" / "checkpoints").iterdir()}


def test_early_stop_ends_after_patience_scorings_without_a_new_best(parts):
    from branchout.stages.training.recipe import train

    job = job_for(parts, "early", "full", **OVERSHOOT, early_stop={"patience": 2})
    result = train(job)
    curve = _curve(parts, job)
    best = result["best_step"]
    assert result["stopped_early_at"] == best + 2 * EVERY == result["steps"] < STEPS, (result, curve)
    assert max(curve) == result["stopped_early_at"]  # nothing trained or scored after it


def test_without_keep_best_the_last_step_is_exported(parts):
    from branchout.stages.training.recipe import train

    job = job_for(parts, "last", "full", **{**OVERSHOOT, "steps": 8}, keep_best=False)
    result = train(job)
    assert result["exported_step"] == 8
    assert _heldout_loss(parts, job, parts[0] / "last" / "model") == pytest.approx(_curve(parts, job)[8], rel=1e-5)
