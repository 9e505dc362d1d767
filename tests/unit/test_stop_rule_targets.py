"""benchmarks/stop_rule.py's verdicts, from made-up run outputs (the runs themselves are the
benchmark's): the share of the budget counts the cooldown, and a fine-tune 1% worse misses."""

from __future__ import annotations

import pytest

from conftest import benchmark_module


@pytest.fixture(scope="module")
def stop_rule():
    with benchmark_module("stop_rule.py") as module:
        yield module


def _run(ppl: dict[str, float], tokens_saved: int = 0, stopped_at: int | None = None) -> dict:
    outputs = {"tokens_saved": tokens_saved, "stop_reason": "saturated" if stopped_at else "no stop rule"}
    if stopped_at:
        outputs["stopped_at"] = stopped_at
    return {"pretrain": {"outputs": outputs}, "forecast": {"tokens_per_step": 2048},
            "metrics": {"domains": {d: {"finetuned_ppl": p} for d, p in ppl.items()}}}


FULL = _run({"legal": 100.0, "code": 50.0, "docs": 80.0})


def test_a_stop_at_half_the_budget_with_fine_tunes_within_one_percent_is_met(stop_rule):
    # stopped at 700, cooled down for 100 more: 800 of 1,600 steps
    stopped = _run({"legal": 100.9, "code": 49.0, "docs": 80.0}, tokens_saved=800 * 2048, stopped_at=700)
    assert stop_rule.steps_trained(stopped) == 800
    steps, ppl = stop_rule.stop_targets(FULL, stopped)
    assert (steps.status, ppl.status) == ("met", "met")
    assert steps.measured == "800 steps, 50% (stopped at 700)"


def test_the_cooldown_counts_and_one_domain_past_one_percent_misses(stop_rule):
    stopped = _run({"legal": 101.5, "code": 50.0, "docs": 80.0}, tokens_saved=799 * 2048, stopped_at=700)
    steps, ppl = stop_rule.stop_targets(FULL, stopped)
    assert steps.status == "missed" and "801" in steps.measured
    assert steps.why == "50% of the budget: stopped at step 700; at the probe before, no probe point before it"
    assert ppl.status == "missed" and ppl.why == "more than 1% worse for legal"


def test_a_rule_that_never_fired_misses_and_says_why(stop_rule):
    never = _run({"legal": 100.0, "code": 50.0, "docs": 80.0})
    never["forecast"]["stop"] = {"why": "legal: forecast gain 2.50% of the remaining budget ≥ epsilon 1.00%"}
    steps, ppl = stop_rule.stop_targets(FULL, never)
    assert steps.status == "missed" and steps.measured.endswith("(never stopped)")
    assert "the rule never fired; at the last probe: legal: forecast gain 2.50%" in steps.why
    # the same steps as the full run: equal perplexities would prove nothing
    assert ppl.status == "not measured" and ppl.measured is None and "never stopped" in ppl.why


def test_a_late_stop_says_why_the_probe_before_went_on(stop_rule):
    """The replay at the point before the stop: the forecast still promised a gain there."""
    stopped = _run({"legal": 100.0, "code": 50.0, "docs": 80.0}, tokens_saved=500 * 1, stopped_at=1000)
    losses = [6.985, 6.673, 6.563, 6.367, 6.269, 6.2, 6.12, 6.05, 5.99, 5.99]
    stopped["forecast"] = {"tokens_per_step": 1, "budget_tokens": 1600, "points": list(range(100, 1001, 100)),
                           "domains": {"legal": {"losses": losses}}, "stop": {"rule": {"epsilon": 0.01}}}
    steps, _ = stop_rule.stop_targets(FULL, stopped)
    assert steps.status == "missed" and steps.why.startswith(
        "69% of the budget: stopped at step 1000; at the probe before, step 900: legal: forecast gain "), steps.why
