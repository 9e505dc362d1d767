"""Shared fixtures: real text corpora (built from this machine's files) and tiny pipelines.

Tests live by tier in ``unit/`` (no Ray, no training), ``integration/`` (a local Ray,
tiny models trained) and ``e2e/`` (the ``branchout`` CLI as a user runs it); the folder
gives each test its tier marker, so ``pytest -m unit`` or ``pytest tests/unit`` pick alike.
"""

from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))

# Tiny on purpose: 2 layers, 32 dims, fixed seeds; enough to learn, seconds to train.
TINY = {
    "name": "tiny",
    "tokenizer": {"vocab_size": 512},
    "model": {"type": "llama", "config": {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 128}},
    "pretrain": {
        "dataset": {"path": "general.jsonl"}, "seq_len": 32, "steps": 12,
        "global_batch_size": 8, "micro_batch_size": 2, "num_workers": 2,
        "resources_per_worker": {"cpu": 1}, "optimizer": {"lr": 3.0e-3},
        "schedule": {"warmup_steps": 2}, "checkpoint_every": 6, "log_every": 2,
        "deepspeed": {"zero_stage": 2}},  # precision: auto
    "finetune": {
        "defaults": {"steps": 8, "global_batch_size": 4, "micro_batch_size": 4, "seq_len": 32,
                     "resources_per_worker": {"cpu": 1}, "schedule": {"warmup_steps": 1},
                     "checkpoint_every": 4, "log_every": 2, "optimizer": {"lr": 2.0e-3}},
        "domains": [
            {"name": "legal", "dataset": {"path": "legal.jsonl"}},
            {"name": "code", "dataset": {"path": "code.jsonl"}},
            {"name": "docs", "dataset": {"path": "docs.jsonl"}, "method": "lora",
             "lora": {"rank": 4, "alpha": 8}},
        ]},
    "evaluate": {"heldout_fraction": 0.2, "max_blocks": 16, "batch_size": 8},
}


def _emulated_bf16() -> str:
    """Why this machine cannot test bf16 arithmetic at speed, or "" where it can."""
    from branchout.core.precision import cpu_hardware

    hw = cpu_hardware()
    return "" if hw.bf16 else (f"tests bf16 arithmetic on purpose, and this CPU ({hw.name}) {hw.why}: torch would "
                               "emulate it, many times slower (core/precision.py)")


# Tests rely on `precision: auto`; the few that need bf16 arithmetic itself run only where
# it is native, never silently slow.
requires_native_bf16 = pytest.mark.skipif(bool(_emulated_bf16()), reason=_emulated_bf16() or "-")

TIERS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = item.path.parent.name
        if tier not in TIERS:
            raise pytest.UsageError(f"{item.path}: tests live in tests/unit, tests/integration or tests/e2e")
        item.add_marker(tier)


def pytest_configure(config):
    """Nothing a test run writes lands in the user's ~/.branchout or ~/.cache/branchout, and
    orphaned processes (the Ray of a SIGKILLed driver) come back to this process to be reaped."""
    import tempfile

    home = Path(tempfile.mkdtemp(prefix="branchout-tests-"))
    os.environ["BRANCHOUT_REGISTRY"] = f"sqlite:///{home / 'registry.db'}"
    os.environ["BRANCHOUT_CACHE_DIR"] = str(home / "cache")
    os.environ.pop("RAY_ADDRESS", None)  # an embedded run must not join someone's cluster
    # Ray Train's controller polls its workers every 2 s by default: each start and end of a
    # seconds-long test run waits on that poll (~4 s a run). Users' runs keep Ray's default;
    # CLI processes and `ray start` nodes inherit this from the test process.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    _become_subreaper()


def _become_subreaper() -> None:
    """PR_SET_CHILD_SUBREAPER: a process orphaned below pytest is re-parented to pytest
    (not to init), so ``reap_leftovers`` can find and end it. Linux only; elsewhere a no-op."""
    import ctypes
    import sys as _sys

    if _sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)


@pytest.fixture(autouse=True)
def isolated_state(tmp_path, monkeypatch):
    """Every test (and every CLI process it starts) has its own registry and local caches."""
    monkeypatch.setenv("BRANCHOUT_REGISTRY", f"sqlite:///{tmp_path / 'registry.db'}")
    monkeypatch.setenv("BRANCHOUT_CACHE_DIR", str(tmp_path / "branchout-cache"))
    saved = dict(os.environ)
    yield
    # Product code may set variables in-process (e.g. RAY_AUTH_MODE when a token file exists);
    # they must not reach the next test's subprocesses.
    if dict(os.environ) != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(autouse=True)
def reap_leftovers():
    """After each test, end the processes it left behind.

    Processes that existed before the test (servers and clusters of module- or
    session-scoped fixtures) and their descendants stay; anything else still below pytest
    (e.g. the raylet of a driver a chaos test SIGKILLed) is killed and reaped, so the
    next test starts on a quiet machine whatever ran before it.
    """
    import psutil

    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield
    doomed = []
    for proc in me.children(recursive=True):
        try:
            chain = {a.pid for a in proc.parents()}
        except psutil.NoSuchProcess:
            continue
        if proc.pid not in before and not chain & before and not _is_pytest_helper(proc):
            doomed.append(proc)
    for proc in doomed:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    _, alive = psutil.wait_procs(doomed, timeout=10)
    assert not alive, f"processes that would not die: {alive}"


def _is_pytest_helper(proc) -> bool:
    """multiprocessing's resource tracker serves this pytest process for its whole life."""
    import psutil

    try:
        return "multiprocessing.resource_tracker" in " ".join(proc.cmdline())
    except psutil.Error:
        return False


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """Small real corpora (general/legal/code/docs JSONL) built by the quickstart's builder."""
    import corpus

    out = tmp_path_factory.mktemp("corpus")
    corpus.build(str(out), {"general": 150_000, "legal": 80_000, "code": 80_000, "docs": 80_000})
    return out


@pytest.fixture
def write_pipeline(corpus_dir, tmp_path):
    """Write a pipeline file next to the corpora: ``write_pipeline(**overrides) -> path``."""

    def write(spec: dict | None = None, name: str = "pipeline.yaml", **top) -> Path:
        data = copy.deepcopy(spec or TINY)
        data.update(top)
        data.setdefault("storage", str(tmp_path / "runs"))
        # point relative dataset paths at the corpora (tolerating specs a test has mangled)
        pretrain = data.get("pretrain") if isinstance(data.get("pretrain"), dict) else {}
        datasets = [pretrain.get("dataset"), *(pretrain.get("datasets") or [])]
        finetune = data.get("finetune")
        if isinstance(finetune, dict) and isinstance(finetune.get("domains"), list):
            datasets += [d.get("dataset") for d in finetune["domains"] if isinstance(d, dict)]
        for ds in datasets:
            if isinstance(ds, dict) and isinstance(ds.get("path"), str) and not os.path.isabs(ds["path"]):
                ds["path"] = str(corpus_dir / ds["path"])
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write


def run_cli(*args: str, timeout: float = 600, env: dict | None = None,
            unset: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run the installed ``branchout`` entry point exactly as a user would: the test process's
    environment, ``env`` on top, the ``unset`` names removed (a merge alone cannot take a
    variable away, such as a token a client must not have)."""
    full = {**os.environ, **(env or {})}
    for key in unset:
        full.pop(key, None)
    return subprocess.run(["branchout", *args], capture_output=True, text=True, timeout=timeout, env=full)


@contextlib.contextmanager
def benchmark_module(script: str):
    """``benchmarks/<script>`` imported under a name of its own, for tests of its verdicts. The
    script puts benchmarks/ on sys.path and imports its neighbours (quickstart, results): both
    are undone after, so no later test imports a benchmark by a common name. Only the
    benchmarks' own modules are forgotten: a library the script imported first (numpy) stays,
    as a compiled extension cannot be loaded twice in one process."""
    import importlib.util

    benchmarks = str(REPO / "benchmarks")
    path, modules = list(sys.path), set(sys.modules)
    try:
        spec = importlib.util.spec_from_file_location(f"{Path(script).stem}_under_test", REPO / "benchmarks" / script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path[:] = path
        for name in set(sys.modules) - modules:
            if (getattr(sys.modules[name], "__file__", None) or "").startswith(benchmarks):
                del sys.modules[name]


@contextlib.contextmanager
def local_ray(namespace: str, **options):
    """An in-process local Ray on this machine's 2 CPUs for one test module, shut down after."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, namespace=namespace,
             **options)
    try:
        yield ray
    finally:
        ray.shutdown()


def job_parts(root: Path, corpus_dir: Path):
    """What a fan-out job needs, made without Ray: a published tokenizer, packed legal data
    and a (randomly initialised) base model. Returns ``(root, data uri, model overrides)``."""
    import json

    from branchout.core.spec import DatasetSpec
    from branchout.stages.job import DataJob
    from branchout.stages.prepare.data import prepare
    from branchout.stages.prepare.tokenizer import (
        load_tokenizer,
        special_token_ids,
        tokenizer_hash,
        train_tokenizer,
    )
    from branchout.stages.training.model import build_config, build_model, export_model
    from branchout.storage.checkpoint import publish_dir

    texts = [json.loads(x)["text"] for x in (corpus_dir / "general.jsonl").read_text().splitlines()]
    train_tokenizer(texts, 512, 2, str(root / "tok-work"))
    publish_dir(str(root / "tok-work"), str(root / "tokenizer"))
    tok = load_tokenizer(str(root / "tokenizer"))
    data = prepare(DataJob(dataset=DatasetSpec(path=str(corpus_dir / "legal.jsonl")),
                           tokenizer_uri=str(root / "tokenizer"),
                           tokenizer_hash=tokenizer_hash(str(root / "tokenizer")), seq_len=32,
                           heldout_fraction=0.2, split_seed=0, cache_root=str(root / "cache")))
    overrides = TINY["model"]["config"]
    base = build_model(build_config("llama", overrides, len(tok), special_token_ids(tok)), seed=1)
    export_model(base, tok, str(root / "base"))
    return root, data.uri, overrides


def job_for(parts, name: str, method: str, **training):
    """A single-worker fine-tune ``TrainJob`` on ``job_parts``' outputs."""
    from branchout.core.spec import FinetuneOptions
    from branchout.stages.job import TrainJob

    root, data_uri, overrides = parts
    values = dict(method=method, steps=6, seq_len=32, global_batch_size=4, micro_batch_size=2,
                  resources_per_worker={"cpu": 1}, schedule={"warmup_steps": 1}, optimizer={"lr": 3e-3},
                  # fp32 on purpose: tests compare weights trained two ways to 1e-4 (and read them as numpy)
                  deepspeed={"zero_stage": 0, "precision": "fp32"}, lora={"rank": 4, "alpha": 8})
    options = FinetuneOptions(**{**values, **training})
    return TrainJob(name=f"finetune/{name}", kind="finetune", training=options,
                    steps=options.steps, model_type="llama", model_overrides=overrides,
                    tokenizer_uri=str(root / "tokenizer"), data_uri=data_uri, out_uri=str(root / name),
                    logs_uri=str(root / "logs"), run_id="test", method=method,
                    base_model_uri=str(root / "base"))


def eval_job(parts, candidates: dict, precision: str, use_gpu: bool = False):
    """The evaluation of ``job_parts``' legal data: ``candidates`` (name → (model uri,
    adapter base uri or None)) on 8 held-out blocks in batches of 4, one thread, no generation."""
    from branchout.stages.job import Candidate, EvalJob

    return EvalJob(domain="legal", data_uri=parts[1], candidates={k: Candidate(*c) for k, c in candidates.items()},
                   batch_size=4, max_blocks=8, threads=1, precision=precision, use_gpu=use_gpu,
                   tokenizer_uri=None, generation_samples=0, max_new_tokens=0)


@pytest.fixture(scope="module")
def s3_bucket():
    """A real S3 API on loopback (moto's server), one per test module, with a bucket."""
    from raycluster import free_port

    port = free_port()
    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1",
                               "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    deadline = time.time() + 30
    while True:
        try:
            boto3.client("s3").create_bucket(Bucket="data-test")
            break
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(0.3)
    yield "s3://data-test"
    server.terminate()
    server.wait(10)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def tokenizer_dir(corpus_dir, tmp_path_factory):
    """A small BPE tokenizer trained on the test corpus and published as a run would."""
    import json

    from branchout.stages.prepare.tokenizer import train_tokenizer
    from branchout.storage.checkpoint import publish_dir

    texts = [json.loads(line)["text"] for line in (corpus_dir / "general.jsonl").read_text().splitlines()]
    work, out = tmp_path_factory.mktemp("tok-work"), tmp_path_factory.mktemp("tok") / "published"
    train_tokenizer(texts, vocab_size=400, min_frequency=2, out_dir=str(work))
    publish_dir(str(work), str(out))
    return str(out)
