"""benchmarks/probes.py's verdicts from made-up numbers (the runs themselves are the benchmark's):
a first-half fit the product judged "no forecast" misses, however close it came."""

from __future__ import annotations

import math

import pytest

from conftest import benchmark_module


@pytest.fixture(scope="module")
def probes():
    with benchmark_module("probes.py") as module:
        yield module


def _targets(probes, errors, rho=0.95, probe_s=5.0, wall=100.0):
    return {t.what: t for t in probes.probe_targets(rho, 18, errors, probe_s, wall, "6 points")}


def test_close_forecasts_the_product_made_are_met(probes):
    t = _targets(probes, {"legal": (5.99, 5.95, "forecast"), "code": (5.50, 5.46, "forecast")})
    forecast = next(v for k, v in t.items() if k.startswith("Forecast"))
    assert forecast.status == "met"
    assert t["Spearman ρ (probe vs fine-tune held-out loss, 18 pairs over every domain)"].status == "met"
    assert t["Probes"].status == "met"  # 5 s beside 95 s: 5.3%


def test_a_close_fit_judged_no_forecast_misses_and_a_far_one_is_named(probes):
    t = _targets(probes, {"legal": (5.99, 5.95, "forecast"), "code": (5.55, 5.46, "no forecast"),
                          "docs": (6.40, 6.17, "forecast")}, rho=0.5, probe_s=46.0, wall=141.0)
    forecast = next(v for k, v in t.items() if k.startswith("Forecast"))
    assert forecast.status == "missed"
    assert forecast.why == "more than 2% off for docs; no forecast (the product's verdict) for code"
    assert t["Probes"].status == "missed" and t["Probes"].measured.startswith("48.4%")
    assert t["Spearman ρ (probe vs fine-tune held-out loss, 18 pairs over every domain)"].status == "missed"


def test_too_few_pairs_for_a_rank_correlation_is_not_measured(probes):
    t = _targets(probes, {}, rho=math.nan)
    assert {v.status for k, v in t.items() if k.startswith(("Spearman", "Forecast"))} == {"not measured"}
