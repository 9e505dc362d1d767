"""Multi-GPU step time is predicted from a measured single-GPU step and ZeRO's volume over
the GPU type's links, and printed as a prediction (the volume itself is counted on real
ranks in tests/integration/test_comm_volume.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from branchout.cluster.interconnect import links, predict_step, step_volume
from branchout.orchestrator.cli import app

REPO = Path(__file__).resolve().parents[2]


def test_volume_is_2_psi_and_3_psi_for_zero3_above_deepspeeds_reuse_distance():
    assert step_volume(2, 1000, 2) == 4000
    assert step_volume(3, 1000, 2) == 4000  # small: stays gathered from forward to backward
    assert step_volume(3, 2_000_000_000, 2) == 12e9
    assert step_volume(3, 1000, 4, reuse_distance=0) == 12000


def test_a_ring_within_a_node_runs_on_nvlink_and_across_nodes_on_the_network():
    one = predict_step(1.0, 2, 1_000_000_000, 2, 1, 8, "H100-80GB")
    assert (one.comm_s, one.overlapped_s, one.serial_s) == (0.0, 1.0, 1.0)
    eight = predict_step(1.0, 2, 1_000_000_000, 2, 8, 8, "H100-80GB")
    assert eight.comm_s == pytest.approx(4e9 * 7 / 8 / links("H100").intra_node)
    sixteen = predict_step(1.0, 2, 1_000_000_000, 2, 16, 8, "H100")
    assert sixteen.comm_s == pytest.approx(4e9 * 15 / 16 / links("H100").inter_node)
    assert sixteen.overlapped_s == max(1.0, sixteen.comm_s) and sixteen.serial_s == 1.0 + sixteen.comm_s
    assert predict_step(1.0, 2, 10, 2, 8, 8, "H900") is None


def test_plan_prints_the_prediction_as_one():
    result = CliRunner().invoke(app, ["plan", str(REPO / "examples" / "llama-1b.yaml"), "--step-s", "0.9"])
    assert result.exit_code == 0, result.output
    assert "PREDICTED (not measured): 0.9 s measured on one GPU" in result.stdout
    assert "ZeRO-3" in result.stdout and "6.60 GB" in result.stdout  # 1.1B 16-bit weights, 3Ψ


def test_plan_step_prediction_needs_a_gpu_type():
    result = CliRunner().invoke(app, ["plan", str(REPO / "examples" / "quickstart.yaml"), "--step-s", "0.9"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: --step-s: name the GPU type")
