"""Probe forecasts (``stages.evaluation.forecast``), the stop rule and the wsd schedule, on
synthetic curves whose law is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from branchout.core.spec import ProbeSpec, ScheduleSpec
from branchout.stages.evaluation.forecast import fit_saturating, forecast, stop_decision
from branchout.stages.training.optim import EarlyEnd, lr_lambda

TOKENS = np.array([1, 2, 4, 8, 12, 16]) * 1_000_000


@pytest.mark.parametrize("floor, scale, alpha", [(2.0, 300.0, 0.4), (3.5, 50.0, 0.25), (1.2, 1000.0, 0.6),
                                                 (0.5, 20.0, 0.15)])
def test_the_fit_recovers_a_known_law(floor, scale, alpha):
    fit = fit_saturating(TOKENS, floor + scale * TOKENS ** -alpha)
    assert pytest.approx(floor, rel=1e-3, abs=1e-3) == fit.E
    assert fit.alpha == pytest.approx(alpha, rel=1e-2)
    assert pytest.approx(scale, rel=5e-2) == fit.A
    assert fit.r2 > 0.9999


def test_a_forecast_from_the_first_half_carries_to_the_end():
    rng = np.random.default_rng(0)
    losses = (2.0 + 300.0 * TOKENS ** -0.4) * (1 + rng.normal(0, 0.002, len(TOKENS)))
    f = forecast(TOKENS[:4], losses[:4], budget=int(TOKENS[-1]))
    assert f.ok, f.why
    truth = 2.0 + 300.0 * TOKENS[-1] ** -0.4
    assert f.final_loss == pytest.approx(truth, rel=0.02)
    assert f.interval[0] <= f.final_loss <= f.interval[1]


def test_no_forecast_rather_than_a_guess():
    assert forecast(TOKENS[:2], [5.0, 4.0], budget=int(TOKENS[-1])).why.startswith("2 probe point(s)")
    # three points fit a three-parameter law exactly: no forecast, however well it "fits"
    exact = TOKENS[:3]
    assert forecast(exact, 2.0 + 300.0 * exact ** -0.4, budget=int(TOKENS[-1])).why.startswith("3 probe point(s)")
    noisy = forecast(TOKENS, [5.0, 4.0, 4.5, 4.0, 4.4, 4.1], budget=int(TOKENS[-1]))
    assert not noisy.ok and "R²" in noisy.why
    # falls most at its end: one noisy pair, closer than half a doubling, is not the regime's start
    late = forecast(TOKENS, [5.0, 4.0, 3.7, 3.5, 3.45, 3.0], budget=int(TOKENS[-1]))
    assert late.fitted_from == TOKENS[0], late
    nan = forecast(TOKENS[:4], [5.0, float("nan"), float("nan"), 4.0], budget=int(TOKENS[-1]))
    assert not nan.ok and nan.why.startswith("2 probe point(s)")


EARLY = np.array([0.25, 0.5, 1, 2, 4, 8, 12, 16]) * 1_000_000


def test_the_transient_before_the_steepest_fall_is_left_out_of_the_fit():
    """A probe from an early checkpoint scores what its own fine-tune reaches (a ceiling), until
    pretraining shows: flat, then the law. The fit takes the law's regime alone, from the start of
    the steepest fall per doubling, and recovers the law; through the flat points it could not."""
    from branchout.stages.evaluation.forecast import regime

    def law(t):
        return 2.0 + 300.0 * t ** -0.4

    curve = np.minimum(law(EARLY), law(2e6))  # flat until 2M tokens, on the law after
    budget = int(EARLY[-1]) * 2
    assert regime(EARLY, curve) == 3  # the fall from 2M to 4M is the steepest
    f = forecast(EARLY, curve, budget)
    assert f.ok and f.fitted_from == 2_000_000, f.why
    assert f.alpha == pytest.approx(0.4, rel=1e-2) and pytest.approx(2.0, abs=1e-2) == f.E
    assert f.final_loss == pytest.approx(law(budget), rel=1e-3)
    through = fit_saturating(EARLY, curve)  # the transient bends the law: off by far more
    assert abs(through.loss(budget) / law(budget) - 1) > 0.01
    # a curve still falling faster at each doubling has not reached the regime: no forecast
    accelerating = forecast(EARLY[:5], [7.0, 6.98, 6.9, 6.7, 6.3], budget)
    assert not accelerating.ok and accelerating.fitted_from == 2_000_000
    assert "2 point(s) in the law's regime; a forecast needs 4" in accelerating.why
    # a law from its first point is fit whole
    assert regime(EARLY, law(EARLY)) == 0


def _history(law, points: int, budget: int):
    history, now = [], []
    for k in range(3, points + 1):
        t = TOKENS[:k]
        history.append({"legal": forecast(t, law(t), budget), "code": forecast(t, law(t) + 0.5, budget)})
        now.append(int(t[-1]))
    return history, now


def test_the_stop_rule_stops_on_a_saturating_curve_and_not_on_a_falling_one():
    budget = int(TOKENS[-1]) * 4  # four times what the curve needs
    saturated, now = _history(lambda t: 3.0 + 5.0 * (t / 1e6) ** -2.5, 6, budget)  # flat after ~8M tokens
    stop, why = stop_decision(saturated, now, epsilon=0.01)
    assert stop, why
    falling, now = _history(lambda t: 1.0 + 300.0 * t ** -0.3, 6, budget)
    stop, why = stop_decision(falling, now, epsilon=0.01)
    assert not stop and "forecast gain" in why
    # patience: one saturated point is not enough; a domain weighted 0 does not hold the stop
    assert not stop_decision(saturated[-1:], now[-1:], epsilon=0.01)[0]
    mixed = [{"legal": s["legal"], "code": f["code"]} for s, f in zip(saturated, falling, strict=True)]
    assert not stop_decision(mixed, now, epsilon=0.01)[0]
    assert stop_decision(mixed, now, epsilon=0.01, weights={"code": 0.0})[0]


def _probes(losses: list[float], every: int = 100, budget_steps: int = 1600):
    """The forecasts after each of ``losses``' probe points (one per ``every`` steps, a
    token per step), as the prober builds them."""
    from branchout.stages.evaluation.forecast import forecast_history

    steps = [every * (i + 1) for i in range(len(losses))]
    return forecast_history(steps, {"legal": losses}, 1, budget_steps)


def test_forecasts_kept_between_probe_points_are_the_ones_made_afresh():
    """The prober keeps a memo across points: at each it fits only the newest prefix; what the
    stop rule reads is the same as forecasting every prefix again (a failed probe's NaN too)."""
    from dataclasses import asdict

    from branchout.stages.evaluation.forecast import forecast_history

    curve = [6.9, 6.6, 6.45, math.nan, 6.3, 6.27]
    losses = {"legal": curve, "code": [v - 0.5 for v in curve]}
    memo: dict = {}
    for n in range(1, len(curve) + 1):
        kept, _ = forecast_history(list(range(100, 100 * n + 1, 100)), {d: v[:n] for d, v in losses.items()}, 1,
                                   1600, memo)
        assert len(memo) == 2 * n  # one new forecast per domain at each point
    fresh, _ = forecast_history(list(range(100, 601, 100)), losses, 1, 1600)
    assert [{d: asdict(f) for d, f in h.items()} for h in kept] == [{d: asdict(f) for d, f in h.items()} for h in fresh]
    assert kept[-1]["legal"].verdict == fresh[-1]["legal"].verdict


def test_a_curve_that_turns_back_up_stops_the_pretrain():
    """Overtraining (or a small corpus overfit): the probes fall, then rise (benchmarks/stop_rule.py's
    probe losses, legal's rounded). The law on the curve's regime (from its steepest fall, step 300
    to 400, on) sees it flatten and stops it at step 800; once the rise spoils every fit, the
    plateau rule still stops it: the rest of the budget plainly gains nothing."""
    curve = [6.99, 6.67, 6.56, 6.37, 6.27, 6.25, 6.26, 6.18, 6.18, 6.24, 6.22, 6.31, 6.46]
    fires = []
    for n in range(1, len(curve) + 1):
        history, now = _probes(curve[:n])
        stop, why = stop_decision(history, now, epsilon=0.01)
        if stop:
            fires.append((n, why))
    assert fires and fires[0][0] == 8, fires  # 700 and 800: under 1% of gain left by the forecast
    assert fires[0][1] == "every domain saturated: legal: forecast gain < 1.00% at 2 probe points in a row"
    history, now = _probes(curve)
    assert not history[-1]["legal"].ok  # the law does not fit the rise: the plateau decides
    assert fires[-1] == (13, "every domain saturated: legal: no better probe in the last 2 points (best 6.18)")
    # a failed latest probe is no evidence: the stop waits for a probe that ran
    history, now = _probes([*curve[:8], float("nan")])  # 800 alone stops it (above)
    stop, why = stop_decision(history, now, epsilon=0.01)
    assert not stop and why == "legal: its probe at this point failed", why


def test_a_slow_steady_fall_with_much_budget_left_goes_on():
    """0.4% better every probe point: two points are < epsilon of gain, but carried over the
    rest of the budget (11 more points) that rate is ~4.4%: not saturated."""
    curve = [6.0 * 0.996 ** i for i in range(5)]
    history, now = _probes(curve)
    stop, why = stop_decision(history, now, epsilon=0.01)
    assert not stop, why
    # the same fall near the budget's end is saturated: one point's worth of budget is left
    history, now = _probes(curve, budget_steps=600)
    stop, why = stop_decision(history, now, epsilon=0.01)
    assert stop and "best probe improved 0.80% over the last 2 points: ~0.40% left at that rate" in why, why
    # a domain's weight scales what is left: 0.40% × 3 ≥ 1% goes on
    stop, why = stop_decision(history, now, epsilon=0.01, weights={"legal": 3.0})
    assert not stop and why.endswith("; its best probe still improves"), why


def test_wsd_is_stable_then_cools_down_and_an_early_end_moves_the_cooldown():
    schedule = ScheduleSpec(kind="wsd", warmup_steps=2, min_lr_ratio=0.1, cooldown_fraction=0.25)
    f = lr_lambda(schedule, 100)
    assert f(0) < f(1) < f(2) == 1.0 == f(74)
    assert f(75) == pytest.approx(1.0) and f(100) == pytest.approx(0.1) and f(88) < 1.0
    early = EarlyEnd()
    g = lr_lambda(schedule, 100, early)
    early.stop_at, early.end = 40, 50
    assert g(39) == 1.0 and g(45) == pytest.approx(0.55) and g(50) == pytest.approx(0.1)


def test_probe_points():
    assert ProbeSpec().points(1600) == [100, 200, 400, 800, 1200, 1600]
    assert ProbeSpec(every=300).points(1000) == [300, 600, 900]
    with pytest.raises(ValueError):
        ProbeSpec(at=[0.5, 1.5])


def test_stop_needs_probes_and_the_wsd_schedule(write_pipeline):
    import copy

    from conftest import TINY, run_cli

    spec = copy.deepcopy(TINY)
    spec["pretrain"]["stop"] = {"epsilon": 0.01}
    out = run_cli("validate", str(write_pipeline(spec)))
    assert out.returncode == 2 and "`stop` acts on the probes' forecasts: set `probes` too" in out.stderr
    spec["pretrain"]["probes"] = {"every": 6, "steps": 2}
    out = run_cli("validate", str(write_pipeline(spec)))
    assert out.returncode == 2 and "pretrain.stop: an early stop cools down from where it stops" in out.stderr


@pytest.mark.parametrize("method, expected", [("lora", ["lora", "lora", "lora"]), ("full", ["full", "full", "full"]),
                                              ("domain", ["full", "full", "lora"])])
def test_a_probe_fine_tunes_by_the_method_asked_or_by_its_domains_own(method, expected):
    """``probes.method: domain``: each probe is the fine-tune its domain will get (TINY's legal and
    code are full fine-tunes, docs LoRA), so probe and real fine-tune losses rank alike across domains."""
    import copy
    from types import SimpleNamespace

    from branchout.core.spec import PipelineSpec
    from branchout.orchestrator.run.driver import probe_targets

    from conftest import TINY

    raw = copy.deepcopy(TINY)
    raw["pretrain"].update(probes={"every": 6, "steps": 3, "method": method})
    spec = PipelineSpec.model_validate(raw)
    targets = probe_targets(spec, {d: SimpleNamespace(uri=f"/data/{d}") for d in ("legal", "code", "docs")})
    assert [t.options.method for t in targets] == expected
    assert [t.domain for t in targets] == ["legal", "code", "docs"] and {t.options.steps for t in targets} == {3}


def test_the_report_says_from_which_step_the_law_was_fit():
    from branchout.orchestrator.run.report import forecast_rows
    from branchout.stages.evaluation.forecast import forecast_history

    curve = [6.93, 6.93, 6.81, 6.75, 6.49, 6.31, 6.26, 6.22, 6.19, 6.15]  # the quickstart's legal probes
    steps = [25, 50, 75, 100, 150, 200, 250, 300, 350, 400]
    history, _ = forecast_history(steps, {"legal": curve}, 2048, 400 * 2048)
    f = history[-1]["legal"]
    record = {"budget_tokens": 400 * 2048, "tokens_per_step": 2048, "stop": None,
              "domains": {"legal": {**f.as_dict(), "forecast_after": [
                  {"step": s, "final_loss": h["legal"].final_loss, "verdict": h["legal"].verdict}
                  for s, h in zip(steps, history, strict=True)]}}}
    (row,) = forecast_rows(record)
    assert row[1] == "10, fit from step 100" and row[-1] == "forecast"
    assert row[4] == "-"  # at half (step 200) three points were in the regime: no forecast then
