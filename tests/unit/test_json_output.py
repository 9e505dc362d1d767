"""`--json` on plan, list and status: the same facts as the tables, for scripts (issue 32)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from branchout.orchestrator.cli import app
from branchout.orchestrator.operate.registry import Registry
from branchout.orchestrator.run.state import JobState, RunRecord

REPO = Path(__file__).resolve().parents[2]


def test_plan_json_has_every_option_the_pick_and_labelled_predictions():
    result = CliRunner().invoke(app, ["plan", str(REPO / "examples" / "llama-1b.yaml"), "--json", "--step-s", "0.9"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    (pretrain,) = [j for j in plan["jobs"] if j["job"] == "pretrain"]
    assert pretrain["pick"] == "ZeRO-0" and len(pretrain["options"]) == 7
    assert all(o["total_bytes"] == o["model_states_bytes"] + o["activations_bytes"] for o in pretrain["options"])
    assert plan["step_prediction"]["predicted"] is True and len(plan["step_prediction"]["rows"]) == 8
    assert plan["model"]["params"] == 1_100_048_384


def test_list_and_status_json(tmp_path, monkeypatch):
    monkeypatch.setenv("BRANCHOUT_REGISTRY", f"sqlite:///{tmp_path / 'r.db'}")
    assert json.loads(CliRunner().invoke(app, ["list", "--json"]).stdout) == []
    record = RunRecord(run_id="20261204-000000-aaaaaa", pipeline="tiny", spec_hash="x",
                       run_uri=str(tmp_path / "runs" / "tiny" / "20261204-000000-aaaaaa"))
    record.set_job("pretrain", JobState.QUEUED)
    record.save()
    Registry().sync(record)
    listed = json.loads(CliRunner().invoke(app, ["list", "--json"]).stdout)
    assert [(r["run_id"], r["pipeline"], r["state"]) for r in listed] == [(record.run_id, "tiny", "pending")]
    assert "source" not in listed[0]
    status = CliRunner().invoke(app, ["status", record.run_id, "--json"])
    assert status.exit_code == 0, status.output
    view = json.loads(status.stdout)
    assert view["run"]["run_id"] == record.run_id and view["record"]["jobs"]["pretrain"]["state"] == "queued"
