"""benchmarks/quickstart.py's verdicts, from made-up runs (the runs themselves are the
benchmark's): only an fp32 run has the time target, and a miss says where the time went and
what kind of CPU it was."""

from __future__ import annotations

import pytest

from conftest import benchmark_module


@pytest.fixture(scope="module")
def quickstart():
    with benchmark_module("quickstart.py") as module:
        yield module


def _run(label: str, used: str, wall: float, pretrain_s: float, tps: float) -> dict:
    return {"label": label, "wall": wall, "precision": {"used": used}, "pretrain_tps": tps,
            "stages": [("tokenizer", 1, 1.0, None), ("pretrain", 1, pretrain_s, tps), ("finetune", 3, 80.0, 1400.0)]}


def test_an_fp32_run_over_the_time_says_its_pretrain_and_the_cpus_matmul_rate(quickstart):
    [target] = quickstart.quickstart_targets([_run("this-cpu", "fp32", 646.4, 360.7, 2340.0)], 31.9)
    assert target.status == "missed" and target.measured == "646 s"
    assert target.why == ("646 s, over 360 s: the pretrain alone took 361 s at 2,340 tokens/s (its steps are the "
                          "shipped file's); this CPU's one-thread fp32 512² matmul ran 31.9 GFLOP/s")


def test_only_the_fp32_run_is_held_to_the_time(quickstart):
    runs = [_run("this-cpu", "bf16", 203.0, 97.0, 8904.0), _run("bf16-emulated", "fp32", 269.0, 142.0, 6015.0)]
    [target] = quickstart.quickstart_targets(runs, 76.4)
    assert target.status == "met" and "bf16 emulated" in target.what
    [none] = quickstart.quickstart_targets(runs[:1], 76.4)
    assert none.status == "not measured" and none.measured is None


def test_the_matmul_rate_is_measured_here(quickstart):
    rate = quickstart.matmul_gflops(rounds=1, n=64, reps=2)
    assert 0 < rate < 10_000  # GFLOP/s of one core: a real timing, not a constant
