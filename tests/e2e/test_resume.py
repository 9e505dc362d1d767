"""SIGKILL the driver in the middle of the fan-out, then `branchout resume`: nothing finished is redone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import yaml

from branchout.orchestrator.operate.registry import Registry
from branchout.orchestrator.run.state import JobState, RunRecord, RunState

from conftest import TINY, run_cli

pytestmark = pytest.mark.slow


def test_driver_killed_mid_fanout_resumes_without_redoing_finished_domains(write_pipeline, tmp_path):
    spec = yaml.safe_load(yaml.safe_dump(TINY))
    spec["evaluate"]["models"] = ["base", "finetuned"]
    for d in spec["finetune"]["domains"][1:]:
        d.update(steps=300, checkpoint_every=20)  # code and docs are still training when legal is done
    path = write_pipeline(spec)
    env = {**os.environ, "BRANCHOUT_REGISTRY": f"sqlite:///{tmp_path / 'registry.db'}"}
    driver = subprocess.Popen(["branchout", "run", str(path)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    run_dir = None
    deadline = time.time() + 300
    while time.time() < deadline:
        time.sleep(0.5)
        found = list((tmp_path / "runs" / "tiny").glob("*/state.json"))
        if not found:
            continue
        run_dir = found[0].parent
        try:
            record = RunRecord.load(str(run_dir))
        except (ValueError, KeyError):
            continue
        code_steps = [json.loads(x)["step"] for x in
                      (run_dir / "logs" / "finetune-code.metrics.jsonl").read_text().splitlines()] \
            if (run_dir / "logs" / "finetune-code.metrics.jsonl").exists() else []
        if record.job("finetune/legal").state is JobState.SUCCEEDED and max(code_steps, default=0) >= 40:
            break
    else:
        driver.kill()
        pytest.fail("the fan-out never reached the point to interrupt:\n" + driver.communicate()[0][-3000:])
    os.kill(driver.pid, signal.SIGKILL)  # no clean-up at all; its embedded Ray goes down with it
    driver.wait()

    before = RunRecord.load(str(run_dir))
    assert before.state is RunState.RUNNING  # nobody recorded the end: the driver just vanished
    run_id = before.run_id

    status = run_cli("status", run_id, env=env)
    assert "driver lost" in status.stdout, status.stdout
    out = run_cli("resume", run_id, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]

    after = RunRecord.load(str(run_dir))
    assert after.state is RunState.SUCCEEDED
    for job in ("tokenizer", "data/pretrain", "pretrain", "finetune/legal"):
        assert after.job(job).attempts == 1, job  # finished before the kill: never redone
    code = after.job("finetune/code")
    assert code.attempts == 2 and code.outputs["resumed_from"] >= 40
    assert code.history[0]["state"] == "failed" and "driver" in code.history[0]["error"]
    attempts = Registry(env["BRANCHOUT_REGISTRY"]).attempts_of(run_id)
    assert [a["attempt"] for a in attempts if a["job"] == "finetune/legal"] == [1]
    assert [a["attempt"] for a in attempts if a["job"] == "finetune/code"] == [1, 2]
