"""End to end on a real local Ray: tokenizer → DeepSpeed pretrain (2 workers) → fan-out → eval.

Each run is the CLI as a user runs it; the assertions read what it left on disk with
real transformers / peft loaders.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from raycluster import free_port

from branchout.orchestrator.run.state import JobState, RunRecord, RunState

from conftest import run_cli


def only_run_dir(storage: Path, pipeline: str = "tiny") -> Path:
    runs = sorted((storage / pipeline).iterdir())
    assert len(runs) == 1, runs
    return runs[0]


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    server = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            break
        except OSError:
            assert server.poll() is None and time.time() < deadline, "mlflow server did not start"
            time.sleep(0.5)
    yield uri
    server.terminate()
    server.wait(30)


@pytest.fixture(scope="module")
def finished_run(corpus_dir, tmp_path_factory, mlflow_uri):
    """One tiny pipeline run with ZeRO-2, tracked in MLflow. ZeRO-3 end to end (construction, a multi-worker
    fine-tune beside warm runners on 2 CPUs, export) is tests/e2e/test_instruct.py's run;
    ZeRO-3 collectives and the 16-bit export are tests/integration/test_gpu_paths.py's."""
    import yaml

    from conftest import TINY

    tmp = tmp_path_factory.mktemp("zero2")
    spec = yaml.safe_load(yaml.safe_dump(TINY))
    spec["storage"] = str(tmp / "runs")
    # half a CPU per fine-tune: 6 jobs packed 4 at a time on 2 CPUs (test_fanout_runs_domains_concurrently);
    # TINY itself gives each job a whole CPU, which starts half the processes
    spec["finetune"]["defaults"]["resources_per_worker"] = {"cpu": 0.5}
    spec["tracking"] = {"mlflow_uri": mlflow_uri, "experiment": "tracking-test"}
    # probes: every domain fine-tuned briefly by the two DeepSpeed workers at 3 of the 12 steps
    spec["pretrain"]["probes"] = {"at": [0.25, 0.5, 1.0], "steps": 2}
    spec["pretrain"]["dataset"]["path"] = str(corpus_dir / "general.jsonl")
    for d in spec["finetune"]["domains"]:
        d["dataset"]["path"] = str(corpus_dir / d["dataset"]["path"])
    path = tmp / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    started = time.time()
    out = run_cli("run", str(path), "--set", "pretrain.deepspeed.zero_stage=2")
    print(f"zero2 pipeline: {time.time() - started:.0f}s")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return 2, only_run_dir(tmp / "runs"), out


def test_run_record_and_cli_output(finished_run):
    zero, run_dir, out = finished_run
    record = RunRecord.load(str(run_dir))
    assert record.state is RunState.SUCCEEDED
    assert all(s.state is JobState.SUCCEEDED for s in record.jobs.values()), record.jobs
    assert f"DeepSpeed ZeRO-{zero}" in out.stdout
    assert "2 workers × micro-batch 2 × grad-accum 2 × 32 tokens = 256 tokens/step" in out.stdout
    assert f"report: {run_dir}/report.html" in out.stdout
    for domain in ("legal", "code", "docs"):
        assert domain in out.stdout.split("results")[-1]


def test_base_model_loads_generates_and_is_not_empty(finished_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, run_dir, _ = finished_run
    model_dir = run_dir / "pretrain" / "model"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    params = dict(model.named_parameters())
    assert all(p.numel() > 0 for p in params.values())
    assert all(float(p.detach().abs().sum()) > 0 for p in params.values())  # ZeRO-3 shards gathered, not empty
    ids = model.generate(**tok("def ", return_tensors="pt"), max_new_tokens=8, do_sample=False)
    assert ids.shape[1] > 2


# 12 steps of a 2-layer model: from ln(512) ≈ 6.24 nats to 5.95 on held-out text (measured,
# ZeRO-2 and ZeRO-3 alike); a pretrain that did not learn stays within noise of its start.
LEARNED_NATS = 0.15


def test_pretrain_lowered_heldout_loss(finished_run):
    """The base model scores the pretraining corpus's held-out blocks at least LEARNED_NATS
    below the very initialisation the pretrain started from (same config, same seed)."""
    import math

    import torch
    from transformers import AutoModelForCausalLM

    from branchout.stages.evaluation.evaluate import perplexity
    from branchout.stages.prepare.data import open_blocks
    from branchout.stages.training.model import build_model

    _, run_dir, _ = finished_run
    trained = AutoModelForCausalLM.from_pretrained(run_dir / "pretrain" / "model", dtype=torch.float32)
    init = build_model(trained.config, seed=0)  # pretrain.seed's default: the run's own starting point
    blocks = open_blocks(RunRecord.load(str(run_dir)).job("data/pretrain").outputs["uri"], "heldout")
    after, _ = perplexity(trained, blocks, batch_size=8, max_blocks=64)
    before, _ = perplexity(init, blocks, batch_size=8, max_blocks=64)
    print(f"held-out loss: init {math.log(before):.3f} → trained {math.log(after):.3f} nats")
    assert math.log(before) - math.log(after) >= LEARNED_NATS, (before, after)


def test_finetunes_load(finished_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, run_dir, _ = finished_run
    for domain in ("legal", "code"):  # full fine-tunes
        path = run_dir / "finetune" / domain / "model"
        model = AutoModelForCausalLM.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        assert model.generate(**tok("The ", return_tensors="pt"), max_new_tokens=4).shape[1] > 1
    base = AutoModelForCausalLM.from_pretrained(run_dir / "pretrain" / "model")
    lora = PeftModel.from_pretrained(base, run_dir / "finetune" / "docs" / "model")
    assert any("lora_A" in n for n, _ in lora.named_parameters())
    config = json.loads((run_dir / "finetune" / "docs" / "model" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8


def test_fanout_runs_domains_concurrently(finished_run):
    _, run_dir, _ = finished_run
    record = RunRecord.load(str(run_dir))
    spans = [(s.started, s.ended) for name, s in record.jobs.items()
             if name.split("/")[0] in ("finetune", "scratch")]
    assert len(spans) >= 3
    most = max(sum(1 for a, b in spans if a <= t < b) for t, _ in spans)
    assert most >= 3, spans


def test_metrics_and_report(finished_run):
    zero, run_dir, _ = finished_run
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    for domain in ("legal", "code", "docs"):
        row = metrics["domains"][domain]
        assert isinstance(row["base_ppl"], float) and isinstance(row["finetuned_ppl"], float)
        assert row["heldout_tokens"] > 0 and row["base_ppl"] > 1
        assert isinstance(row["scratch_ppl"], float)
    report = (run_dir / "report.md").read_text()
    assert "| legal | full | succeeded |" in report and "| docs | lora | succeeded |" in report
    html = (run_dir / "report.html").read_text()
    # training loss, perplexity, and the probes' forecast (pretrain.probes is on in this run)
    assert html.count("data:image/png;base64,") == 3
    assert "<h2>Probe loss against pretraining tokens, and its forecast</h2>" in html and "<h2>Probe forecasts</h2>" in html
    assert (run_dir / "logs" / "pretrain.metrics.jsonl").exists()
    assert list((run_dir / "logs" / "tensorboard" / "pretrain").glob("events.out.tfevents.*"))


def test_mlflow_parent_run_children_per_job_metrics_and_report(finished_run, mlflow_uri):
    """MLflow tracking against a real `mlflow server` on 127.0.0.1: a parent run per pipeline
    run, one child per job with its step metrics, the final numbers and the report."""
    from mlflow.tracking import MlflowClient

    _, run_dir, out = finished_run
    assert "MLflow tracking" not in out.stdout  # no tracking failure was reported

    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name("tracking-test")
    runs = client.search_runs([experiment.experiment_id], max_results=200)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    run_id = parent.data.tags["branchout.run_id"]
    record = RunRecord.load(str(run_dir))
    assert record.run_id == run_id and record.tracking["run_id"] == parent.info.run_id  # kept for resume
    children = {r.data.tags["branchout.job"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    jobs = {"tokenizer", "data/pretrain", "pretrain", *(f"{k}/{d}" for k in ("data", "finetune", "scratch", "evaluate")
                                                       for d in ("legal", "code", "docs"))}
    assert set(children) == jobs
    assert all(r.info.status == "FINISHED" for r in children.values())
    assert parent.info.status == "FINISHED" and parent.data.params["pretrain.steps"] == "12"

    steps = [m.step for m in client.get_metric_history(children["pretrain"].info.run_id, "loss")]
    assert steps == sorted(steps) and steps[-1] == 12 and len(steps) >= 6  # logged live, every log_every
    assert len(client.get_metric_history(children["finetune/code"].info.run_id, "loss")) >= 4
    assert children["evaluate/legal"].data.metrics["base_ppl"] > 1
    assert children["pretrain"].data.metrics["final_loss"] > 0
    assert parent.data.metrics["legal.finetuned_ppl"] > 1 and "legal.transfer_gain" in parent.data.metrics
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.md", "report.html"} <= artifacts
    assert run_id in out.stdout


def test_probes_run_on_the_pretrains_workers_and_forecast_each_domain(finished_run):
    """pretrain.probes under ZeRO-2 on 2 workers: the weights published at steps 3, 6 and 12,
    the three domains shared over the ranks, their losses gathered and each domain's curve
    fit (eval/forecast.json; with three noisy points of a 12-step run a forecast may say it
    has none, and says why)."""
    import math

    _, run_dir, _ = finished_run
    pretrain = RunRecord.load(str(run_dir)).job("pretrain")
    assert pretrain.state is JobState.SUCCEEDED
    forecast = json.loads((run_dir / "eval" / "forecast.json").read_text())
    assert forecast["points"] == [3, 6, 12]
    assert set(forecast["domains"]) == {"legal", "code", "docs"}
    for domain, f in forecast["domains"].items():
        assert len(f["losses"]) == 3 and all(math.isfinite(v) and v > 0 for v in f["losses"]), (domain, f)
        assert f["verdict"] in ("forecast", "no forecast") and (f["verdict"] == "forecast" or f["why"])
    assert all((run_dir / "pretrain" / "probes" / f"step_{s:08d}" / "model" / "config.json").exists() for s in (3, 6, 12))
    assert pretrain.outputs["probe_points"] == [3, 6, 12] and pretrain.outputs["probe_seconds"] > 0
    assert "stopped_at" not in pretrain.outputs  # no pretrain.stop: probes only inform

