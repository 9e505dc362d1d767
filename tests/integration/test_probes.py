"""``pretrain.probes`` on the real pretrain path (``stages.training.recipe.train``, one worker):
probe fine-tunes between its steps, their losses and forecasts written, a failing probe that
does not fail the pretrain; and the loop's early end with its cooldown."""

from __future__ import annotations

import json
import math

import pytest

from conftest import TINY, job_for, job_parts

STEPS = 12


@pytest.fixture(scope="module")
def parts(corpus_dir, tmp_path_factory):
    from branchout.core.spec import DatasetSpec
    from branchout.stages.job import DataJob
    from branchout.stages.prepare.data import prepare
    from branchout.stages.prepare.tokenizer import tokenizer_hash

    root, legal, overrides = job_parts(tmp_path_factory.mktemp("probes"), corpus_dir)
    tok = str(root / "tokenizer")
    general = prepare(DataJob(dataset=DatasetSpec(path=str(corpus_dir / "general.jsonl")), tokenizer_uri=tok,
                              tokenizer_hash=tokenizer_hash(tok), seq_len=32, heldout_fraction=0.2, split_seed=0,
                              cache_root=str(root / "cache")))
    return root, general.uri, legal


def _pretrain(parts, out: str, **training):
    from branchout.core.spec import PretrainSpec
    from branchout.stages.job import TrainJob

    root, general, _ = parts
    t = PretrainSpec(dataset={"path": "unused"}, steps=STEPS, seq_len=32, global_batch_size=8, micro_batch_size=4,
                     checkpoint_every=4, log_every=4, optimizer={"lr": 3e-3}, deepspeed={"precision": "fp32"},
                     **training)
    return TrainJob(name="pretrain", kind="pretrain", training=t, steps=STEPS, model_type="llama",
                    model_overrides=TINY["model"]["config"], tokenizer_uri=str(root / "tokenizer"), data_uri=general,
                    out_uri=str(root / out), logs_uri=str(root / "logs"), run_id="test")


def test_probes_fine_tune_every_domain_between_steps_and_a_failing_one_does_not_fail_the_pretrain(parts):
    from dataclasses import replace

    import torch

    from branchout.stages.training.probes import ProbeTarget
    from branchout.stages.training.recipe import train

    root, _, legal = parts
    options = job_for((root, legal, TINY["model"]["config"]), "x", "lora", steps=4, eval_every=4, eval_blocks=8,
                      keep_best=False).training
    # a stop rule the broken domain keeps from firing (a domain without a forecast never lets it stop)
    job = replace(_pretrain(parts, "pre", probes={"every": 4, "steps": 4}, schedule={"kind": "wsd", "warmup_steps": 2},
                            stop={"epsilon": 0.01, "patience": 1}, resources_per_worker={"cpu": 2}),
                  probes=(ProbeTarget("legal", legal, options), ProbeTarget("broken", str(root / "nowhere"), options)))
    threads = torch.get_num_threads()
    try:
        result = train(job)  # the pretrain on 2 threads, its probes on 1 (their domain's resources)
        assert torch.get_num_threads() == 2  # the pretrain went on with its own threads after each probe
    finally:
        torch.set_num_threads(threads)
    assert result["steps"] == STEPS and result["probe_points"] == [4, 8, 12] and result["probe_seconds"] > 0
    history = json.loads((root / "pre" / "probes" / "probes.json").read_text())["history"]
    assert sorted(history, key=int) == ["4", "8", "12"]
    for point in history.values():
        assert math.isfinite(point["legal"]["loss"]) and point["legal"]["loss"] > 0
        assert math.isnan(point["broken"]["loss"]) and point["broken"]["error"]
    # each probe started from that point's published weights, a model any loader reads; a probe
    # itself keeps nothing: no export, no checkpoint, no result (its loss is what it returns)
    assert (root / "pre" / "probes" / "step_00000008" / "model" / "config.json").exists()
    assert not (root / "pre" / "probes" / "step_00000008" / "legal").exists()
    assert (root / "logs" / "pretrain-probe-8-legal.metrics.jsonl").exists()
    forecast = json.loads((root / "pre" / "probes" / "forecast.json").read_text())
    assert forecast["points"] == [4, 8, 12] and forecast["budget_tokens"] == STEPS * 8 * 32
    assert forecast["domains"]["legal"]["losses"] == [history[s]["legal"]["loss"] for s in ("4", "8", "12")]
    assert forecast["domains"]["broken"]["verdict"] == "no forecast"
    assert [f["step"] for f in forecast["domains"]["legal"]["forecast_after"]] == [4, 8, 12]
    # at the budget's end the rule is not asked; the record keeps why it went on the probe before
    assert forecast["stop"]["stopped_at"] is None
    assert forecast["stop"]["why"].startswith("the end of the budget; at the probe before: ")
    assert ": no forecast (" in forecast["stop"]["why"]


def test_a_stop_ends_the_run_after_a_cooldown_on_the_wsd_schedule(parts):
    """What the loop does when the prober says stop (the rule itself: tests/unit/test_forecast.py)."""
    import torch

    from branchout.stages.prepare.data import open_blocks
    from branchout.stages.prepare.tokenizer import load_tokenizer
    from branchout.stages.training.engine import TorchEngine
    from branchout.stages.training.loop import run_steps
    from branchout.stages.training.model import prepare_model

    class StopAt8:
        def due(self, step):
            return step in (4, 8)

        def __call__(self, engine, step):
            return step == 8

    root = parts[0]
    job = _pretrain(parts, "stopped", schedule={"kind": "wsd", "warmup_steps": 2, "cooldown_fraction": 0.25,
                                                "min_lr_ratio": 0.1})
    torch.manual_seed(0)
    engine = TorchEngine(prepare_model(job, load_tokenizer(str(root / "tokenizer"))), job.training, STEPS)
    saved = []
    result = run_steps(engine, open_blocks(job.data_uri, "train"), job.training, STEPS, 0, 0, 1, None,
                       lambda step, loss: saved.append(step), prober=StopAt8())
    assert result.steps == 10  # stopped at 8, then a cooldown of 0.25 × 8 = 2 steps
    assert (engine.early.stop_at, engine.early.end) == (8, 10)
    assert engine.lr() == pytest.approx(3e-3 * 0.1)  # cooled down to min_lr_ratio at the new end
    assert saved == [4, 8, 10]  # the last step of the shortened run is checkpointed as a last step is


def test_a_probe_inside_the_cooldown_is_recorded_and_the_stop_and_its_reason_stand(parts, tmp_path):
    """The prober as the loop calls it at every probe point, its probe fine-tunes replaced by
    the losses benchmarks/stop_rule.py's probes recorded (legal's): it stops at 700 of 1600; the
    point at 800, inside the cooldown, is probed and written but decided no more, before and
    after a restart."""
    from dataclasses import replace
    from types import SimpleNamespace

    from branchout.stages.training.optim import EarlyEnd
    from branchout.stages.training.probes import Prober, ProbeTarget

    curve = {100: 6.985, 200: 6.673, 300: 6.563, 400: 6.367, 500: 6.269, 600: 6.253, 700: 6.258, 800: 6.18}
    options = job_for((parts[0], parts[2], TINY["model"]["config"]), "x", "lora", steps=2).training
    job = replace(_pretrain(parts, "cooldown", probes={"every": 100, "steps": 2},
                            schedule={"kind": "wsd", "warmup_steps": 2, "cooldown_fraction": 0.25},
                            stop={"epsilon": 0.01}),
                  steps=1600, out_uri=str(tmp_path / "pre"), probes=(ProbeTarget("legal", parts[2], options),))

    def prober() -> Prober:
        p = Prober(job, 0, 1, train=lambda j, **_: {"best_eval_loss": curve[int(j.name.split("-")[2])],
                                                    "started": 0.0, "ended": 0.0, "seconds": 0.0})
        p._publish = lambda engine, step: "unused"  # no weights to publish: the probe above reads none
        return p

    engine = SimpleNamespace(early=EarlyEnd())
    first = prober()
    said = {step: first(engine, step) for step in range(100, 701, 100)}
    assert [s for s, stop in said.items() if stop] == [700], said
    engine.early.stop_at, engine.early.end = 700, 875  # what the loop does on the stop: 0.25 × 700 to cool down
    why = first.why
    assert why == "every domain saturated: legal: forecast gain < 1.00% at 2 probe points in a row", why
    forecast_file = tmp_path / "pre" / "probes" / "forecast.json"
    for p in (first, prober()):  # the same process, then a restarted one (its history read back)
        assert p(engine, 800) is False
        record = json.loads(forecast_file.read_text())
        assert record["points"][-1] == 800 and record["domains"]["legal"]["losses"][-1] == 6.18
        assert record["stop"]["stopped_at"] == 700 and record["stop"]["why"] == why
        assert p.outputs(875)["stopped_at"] == 700 and p.outputs(875)["stop_reason"] == why
