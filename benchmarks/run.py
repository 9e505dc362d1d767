"""The benchmark suite: every row a ratio measured side by side in this one run.

    python benchmarks/run.py            # ~15 minutes on 2 CPU cores; writes its section of RESULTS.md

1. orchestration overhead: tokens/s of a 1-worker branchout pretrain (Ray Train) with the
   plain torch engine (what one worker uses) and with DeepSpeed (`deepspeed.engine:
   deepspeed`), each vs a raw single-process torch loop, same model, batch, threads (≥ 0.97);
   and a 2-worker DeepSpeed ZeRO-2 pretrain (a CPU each, the same global batch) against the
   same raw loop on both cores (issue 27: ≥ 0.95)
2. MFU of that pretrain against this machine's measured fp32 matmul peak
3. per-job fan-out overhead, dispatch → first optimizer step: the first wave exactly as a
   fan-out starts it (a fresh PoolSet: runners start, the base is loaded on a worker) and
   warm dispatch afterwards, vs one TorchTrainer per job (≤ 0.5 s warm, ≥ 20× better)
4. makespan of 16 small fine-tunes on 2 warm slots vs ideal = Σ job compute ÷ slots (≤ 1.1×)
5. memory of 4 concurrent LoRA jobs vs 1 on a 0.83B base: Σ PSS of every runner process and
   of the raylet (which holds the object store's shared base), measured (≤ 1.2×), without
   and with activation checkpointing
6. 2-worker ZeRO-2 and ZeRO-3 vs 1 worker, same global batch (no target: 2 cores limit it)

Rule, fixed before measuring: the statistic each row names (rows 1: the median of 3
alternating rounds' ratios; 3: the median dispatch time; 4, 5, 6: one run). Rows 2, 3 (cold)
and 6 carry no target; every other row's target is judged in code from its number, and the
section ends with one status per target.

GPU rows are benchmarks/gpu.py's section; nothing here pretends to measure a GPU.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))

import corpus  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))

from results import Target, stamp, status, targets_table, write_section  # noqa: E402

# The quickstart's model: a 3.3M-parameter Llama.
MODEL = {"hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 4, "max_position_embeddings": 512}
SEQ, MICRO = 128, 8
rows: list[tuple[str, str, str, str]] = []  # (benchmark, ratio, raw numbers, target)
targets: list[Target] = []  # each row's target, judged from its number as it is measured
NO_TARGET = "-"


def limits(n: int) -> str:
    """The why of a missed target: the row's note under "What limits each row"."""
    return f"see 'What limits each row', {n}"


def row(name: str, ratio: str, raw: str, target: str) -> None:
    rows.append((name, ratio, raw, target))
    print(f"{name}: {ratio}   ({raw})   target {target}", flush=True)


def build_parts(work: Path):
    """A published tokenizer and packed data, as the pipeline's first two stages make them."""
    from branchout.core.spec import DatasetSpec
    from branchout.stages.job import DataJob
    from branchout.stages.prepare.data import prepare
    from branchout.stages.prepare.tokenizer import tokenizer_hash, train_tokenizer
    from branchout.storage.checkpoint import publish_dir

    corpus.build(str(work / "data"), {"general": 1_600_000, "legal": 300_000, "code": 300_000, "docs": 300_000})
    texts = [json.loads(x)["text"] for x in (work / "data" / "general.jsonl").read_text().splitlines()]
    train_tokenizer(texts, 4096, 2, str(work / "tok"))
    publish_dir(str(work / "tok"), str(work / "tokenizer"))
    h = tokenizer_hash(str(work / "tokenizer"))
    general = prepare(DataJob(dataset=DatasetSpec(path=str(work / "data" / "general.jsonl")),
                              tokenizer_uri=str(work / "tokenizer"), tokenizer_hash=h, seq_len=SEQ,
                              heldout_fraction=0.1, split_seed=0, cache_root=str(work / "cache")))
    legal = prepare(DataJob(dataset=DatasetSpec(path=str(work / "data" / "legal.jsonl")),
                            tokenizer_uri=str(work / "tokenizer"), tokenizer_hash=h, seq_len=32,
                            heldout_fraction=0.1, split_seed=0, cache_root=str(work / "cache")))
    return general.uri, legal.uri


def pretrain_job(work: Path, data_uri: str, name: str, workers: int, zero: int, steps: int, cpus: float,
                 global_batch: int = MICRO, engine: str = "auto"):
    from branchout.core.spec import PretrainSpec
    from branchout.stages.job import TrainJob

    spec = PretrainSpec(dataset={"path": "unused"}, seq_len=SEQ, steps=steps, global_batch_size=global_batch,
                        micro_batch_size=global_batch // workers, num_workers=workers,
                        resources_per_worker={"cpu": cpus}, checkpoint_every=10**6, log_every=10,
                        schedule={"warmup_steps": 5},
                        deepspeed={"zero_stage": zero, "precision": "fp32", "engine": engine},
                        max_failures=0)
    return TrainJob(name=name, kind="pretrain", training=spec, steps=steps,
                    model_type="llama", model_overrides=MODEL, tokenizer_uri=str(work / "tokenizer"),
                    data_uri=data_uri, out_uri=str(work / name), logs_uri=str(work / "logs"), run_id="bench")


def steady_tokens_per_s(work: Path, job: str) -> float:
    """Mean tokens/s of the logged windows after the first (start-up excluded)."""
    from branchout.stages.training.metrics import read_metrics

    points = [p["tokens_per_s"] for p in read_metrics(str(work / "logs"), job) if "tokens_per_s" in p]
    return statistics.mean(points[2:]) if len(points) > 3 else statistics.mean(points)


def raw_torch_tokens_per_s(data_uri: str, steps: int) -> float:
    """The same model, batch and threads in a bare torch loop: the ceiling."""
    import numpy as np
    import torch

    from branchout.core.spec import OptimizerSpec
    from branchout.stages.prepare.data import open_blocks
    from branchout.stages.training.model import build_config, build_model
    from branchout.stages.training.optim import build_optimizer

    torch.set_num_threads(2)
    model = build_model(build_config("llama", MODEL, 4096), seed=0)
    opt = build_optimizer(model, OptimizerSpec())
    blocks = open_blocks(data_uri, "train")
    warmup = 10
    for step in range(steps):
        if step == warmup:  # wall time from here, as branchout's logged windows are
            start = time.perf_counter()
        batch = torch.from_numpy(np.asarray(blocks[(step * MICRO) % (len(blocks) - MICRO):][:MICRO], dtype=np.int64))
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (steps - warmup) * MICRO * SEQ / (time.perf_counter() - start)


def matmul_peak_flops(threads: int = 2) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(3):
        a @ b
    n = 10
    start = time.perf_counter()
    for _ in range(n):
        a @ b
    return n * 2 * 2048**3 / (time.perf_counter() - start)


def runner_pids(count: int, timeout_s: float = 300) -> list[int]:
    """Process ids of the ``count`` live warm runners: Ray titles an actor's process
    ``ray::JobRunner`` (``ray::JobRunner.run`` while it runs a job). This embedded Ray has
    no dashboard, so the state API is not there to ask."""
    import psutil

    deadline = time.time() + timeout_s
    while True:
        pids = []
        for proc in psutil.process_iter(["cmdline"]):
            cmd = proc.info["cmdline"] or []
            if cmd and cmd[0].startswith("ray::JobRunner"):
                pids.append(proc.pid)
        if len(pids) >= count:
            return pids
        if time.time() > deadline:
            raise RuntimeError(f"{len(pids)} of {count} warm runners came up in {timeout_s:.0f} s")
        time.sleep(1)


def finetune_job(work: Path, data_uri: str, name: str, steps: int, method: str = "full", base: str | None = None,
                 model: dict | None = None, activation_checkpointing: bool = False):
    from branchout.core.spec import FinetuneOptions
    from branchout.stages.job import TrainJob

    options = FinetuneOptions(method=method, steps=steps, seq_len=32, global_batch_size=4, micro_batch_size=4,
                              resources_per_worker={"cpu": 1}, schedule={"warmup_steps": 1},
                              checkpoint_every=10**6, deepspeed={"zero_stage": 0, "precision": "fp32"},
                              lora={"rank": 8, "alpha": 16}, activation_checkpointing=activation_checkpointing)
    return TrainJob(name=f"finetune/{name}", kind="finetune", training=options,
                    steps=steps, model_type="llama", model_overrides=model or MODEL,
                    tokenizer_uri=str(work / "tokenizer"), data_uri=data_uri, out_uri=str(work / "ft" / name),
                    logs_uri=str(work / "logs"), run_id="bench", method=method,
                    base_model_uri=base or str(work / "base"))


def process_memory(pid: int) -> dict[str, int]:
    """USS (private), PSS (private + a fair share of what is shared) and shared resident
    bytes of one process, from /proc/<pid>/smaps_rollup."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0]) * 1024
    return {"private": fields["Private_Clean"] + fields["Private_Dirty"], "pss": fields["Pss"],
            "shared": fields["Shared_Clean"] + fields["Shared_Dirty"]}


def raylet_pid() -> int:
    """The local raylet, which holds the object store (shared memory) in its process."""
    import psutil

    return next(p.pid for p in psutil.process_iter(["name", "cmdline"])
                if p.info["name"] == "raylet" or "raylet" in " ".join(p.info["cmdline"] or [])[:200].split("/")[-1])


def main() -> int:
    import ray

    from branchout.orchestrator.config.plan import ModelShape  # noqa: F401  (the FLOPs formula lives in Plan)
    from branchout.orchestrator.run.pool import PoolSet
    from branchout.orchestrator.run.ray_train import run_distributed
    from branchout.stages.prepare.tokenizer import load_tokenizer
    from branchout.stages.training.model import (
        build_config,
        build_model,
        export_model,
        parameter_counts,
    )

    started, stamped = time.time(), stamp()
    work = Path(tempfile.mkdtemp(prefix="branchout-bench-"))
    general, legal = build_parts(work)
    tok = load_tokenizer(str(work / "tokenizer"))
    export_model(build_model(build_config("llama", MODEL, len(tok)), seed=0), tok, str(work / "base"))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="bench")

    # 1 + 2: orchestration overhead and MFU. This machine's throughput drifts over minutes (a
    # shared host), so the three are measured alternately and the ratios taken per round;
    # the raw loop runs in a fresh process, as the Ray worker does.
    ratios: dict[str, list[float]] = {"plain": [], "deepspeed": [], "deepspeed-2w": []}
    runs: dict[str, list[float]] = {"plain": [], "deepspeed": [], "deepspeed-2w": [], "raw": []}
    for i in range(3):
        runs["raw"].append(float(subprocess.run([sys.executable, __file__, "--raw", general, "70"], check=True,
                                                capture_output=True, text=True).stdout.split()[-1]))
        for engine, name in (("plain", "auto"), ("deepspeed", "deepspeed")):
            run_distributed(pretrain_job(work, general, f"pretrain-1w-{engine}-{i}", 1, 0, 100, 2.0, engine=name))
            runs[engine].append(steady_tokens_per_s(work, f"pretrain-1w-{engine}-{i}"))
            ratios[engine].append(runs[engine][-1] / runs["raw"][-1])
        # two workers, a CPU and a torch thread each, the same global batch (a micro-batch of half)
        run_distributed(pretrain_job(work, general, f"pretrain-2w-ds-{i}", 2, 2, 100, 1.0, engine="deepspeed"))
        runs["deepspeed-2w"].append(steady_tokens_per_s(work, f"pretrain-2w-ds-{i}"))
        ratios["deepspeed-2w"].append(runs["deepspeed-2w"][-1] / runs["raw"][-1])
    raw = statistics.median(runs["raw"])
    for engine, label in (("plain", "plain torch engine"), ("deepspeed", "DeepSpeed engine")):
        ours, ratio = statistics.median(runs[engine]), statistics.median(ratios[engine])
        row(f"1. 1-worker pretrain, {label}, vs raw torch loop (tokens/s)", f"{ratio:.3f}",
            f"median of 3 alternating rounds ({', '.join(f'{r:.3f}' for r in ratios[engine])}); {ours:,.0f} vs "
            f"{raw:,.0f} tok/s; fp32, 2 threads, micro-batch {MICRO} × {SEQ}", "≥ 0.97")
        targets.append(Target(f"1-worker pretrain, {label}, tokens/s vs a raw torch loop (median of 3 rounds)",
                              "≥ 0.97", f"{ratio:.3f}", status(ratio >= 0.97), why=limits(1)))
    two, ratio = statistics.median(runs["deepspeed-2w"]), statistics.median(ratios["deepspeed-2w"])
    row("1. 2-worker pretrain, DeepSpeed ZeRO-2 engine, vs raw torch loop (tokens/s)", f"{ratio:.3f}",
        f"median of 3 alternating rounds ({', '.join(f'{r:.3f}' for r in ratios['deepspeed-2w'])}); {two:,.0f} vs "
        f"{raw:,.0f} tok/s; fp32, 2 workers × 1 thread, micro-batch {MICRO // 2} × {SEQ} each", "≥ 0.95")
    targets.append(Target("2-worker pretrain, DeepSpeed ZeRO-2 engine, tokens/s vs a raw torch loop (median of 3 "
                          "rounds; issue 27)", "≥ 0.95", f"{ratio:.3f}", status(ratio >= 0.95), why=limits(6)))
    ours = statistics.median(runs["plain"])
    _, non_emb = parameter_counts(build_config("llama", MODEL, 4096))
    flops_per_token = 6 * non_emb + 12 * MODEL["num_hidden_layers"] * MODEL["hidden_size"] * SEQ
    peak = matmul_peak_flops()
    row("2. MFU of the 1-worker pretrain (CPU, fp32)", f"{ours * flops_per_token / peak:.1%}",
        f"{ours * flops_per_token / 1e9:.1f} GFLOP/s of {peak / 1e9:.0f} GFLOP/s measured 2048² matmul peak",
        NO_TARGET)

    # 3: per-job fan-out overhead, dispatch → first optimizer step
    trainer = []  # one TorchTrainer per job (before the pool holds the CPUs)
    for i in range(2):
        dispatched = time.time()
        r = run_distributed(pretrain_job(work, general, f"tt{i}", 1, 0, 2, 1.0))
        trainer.append(r["first_step_at"] - dispatched)
    trainer_s = statistics.median(trainer)
    # the first wave exactly as stage_finetune starts it: a fresh PoolSet, jobs submitted at once
    pools = PoolSet(str(work / "base"), None, fixed_cluster=True)
    first = []
    dispatched = time.time()
    for f in [pools.submit(finetune_job(work, legal, f"cold-{i}", 2), {"CPU": 1.0}, 2) for i in range(2)]:
        first.append(f.result()["first_step_at"] - dispatched)
    warm = []
    for i in range(6):
        dispatched = time.time()
        r = pools.submit(finetune_job(work, legal, f"w{i}", 2), {"CPU": 1.0}, 1).result()
        warm.append(r["first_step_at"] - dispatched)
    warm_s, cold_s = statistics.median(warm), statistics.median(first)
    row("3. fan-out overhead, first wave (cold pool) vs TorchTrainer per job", f"{trainer_s / cold_s:.1f}× better",
        f"{cold_s:.2f} s vs {trainer_s:.1f} s dispatch → first step (median; runners start, base loaded on a worker)",
        NO_TARGET)
    row("3. fan-out overhead, warm dispatch vs TorchTrainer per job", f"{trainer_s / warm_s:.0f}× better",
        f"{warm_s:.3f} s vs {trainer_s:.1f} s dispatch → first step (median of 6)", "≤ 0.5 s, ≥ 20×")
    targets.extend([Target("fan-out, warm dispatch → first step (median of 6)", "≤ 0.5 s", f"{warm_s:.3f} s",
                       status(warm_s <= 0.5), why=limits(3)),
                Target("fan-out, warm dispatch vs a TorchTrainer per job, dispatch → first step", "≥ 20× sooner",
                       f"{trainer_s / warm_s:.0f}×", status(trainer_s / warm_s >= 20), why=limits(3))])
    pool = next(iter(pools.pools.values()))

    # 4: makespan of 16 small fine-tunes on 2 slots
    t0 = time.time()
    results = [f.result() for f in [pool.submit(finetune_job(work, legal, f"m{i}", 20)) for i in range(16)]]
    makespan = max(r["ended"] for r in results) - t0
    ideal = sum(r["ended"] - r["started"] for r in results) / 2
    row("4. makespan of 16 fine-tunes on 2 slots vs ideal", f"{makespan / ideal:.2f}×",
        f"{makespan:.1f} s vs {ideal:.1f} s = Σ job time ÷ 2", "≤ 1.1×")
    targets.append(Target("makespan of 16 fine-tunes on 2 slots vs Σ job time ÷ 2", "≤ 1.1×",
                          f"{makespan / ideal:.2f}×", status(makespan / ideal <= 1.1), why=limits(4)))
    pool.shutdown()

    # 5: memory of 4 concurrent LoRA jobs vs 1 on a 0.83B-parameter (3.1 GiB fp32) base:
    # every byte counted as the kernel does, Σ PSS (private + a fair share of what is
    # shared) of each runner and of the raylet, whose object store holds the base once.
    big = {"hidden_size": 2048, "intermediate_size": 5504, "num_hidden_layers": 16, "num_attention_heads": 16,
           "num_key_value_heads": 16, "max_position_embeddings": 128}
    export_model(build_model(build_config("llama", big, len(tok)), seed=0), tok, str(work / "bigbase"))
    raylet = raylet_pid()
    memory: dict[tuple[bool, int], dict] = {}
    for ckpt in (False, True):
        for k in (1, 4):
            pools = PoolSet(str(work / "bigbase"), None, fixed_cluster=False)
            futures = [pools.submit(finetune_job(work, legal, f"lora{k}{ckpt}-{i}", 10_000, "lora",
                                                 str(work / "bigbase"), big, activation_checkpointing=ckpt),
                                    {"CPU": 0.5}, k) for i in range(k)]
            pids = runner_pids(k)  # not runner.ready(): it would queue behind the job the runner runs
            peak = {"total": 0}
            for _ in range(25):  # the peak over ~50 s of training (steps take seconds)
                time.sleep(2)
                now = {pid: process_memory(pid) for pid in pids} | {raylet: process_memory(raylet)}
                total = sum(m["pss"] for m in now.values())
                if total > peak["total"]:
                    peak = {"total": total, "runner_uss": statistics.mean(now[p]["private"] for p in pids),
                            "raylet_pss": now[raylet]["pss"]}
            assert not any(f.done() for f in futures), "a LoRA job ended before its memory was measured"
            pools.shutdown()  # the jobs' results are not needed, only what they held
            memory[(ckpt, k)] = peak
            time.sleep(3)
        one, four = memory[(ckpt, 1)], memory[(ckpt, 4)]
        row(f"5. memory of 4 concurrent LoRA jobs vs 1 (shared base{', activation checkpointing' if ckpt else ''})",
            f"{four['total'] / one['total']:.2f}×",
            f"Σ PSS {four['total'] / 2**30:.2f} GiB vs {one['total'] / 2**30:.2f} GiB (runners + raylet's object "
            f"store); private per runner {four['runner_uss'] / 2**20:,.0f} MiB with 4 vs {one['runner_uss'] / 2**20:,.0f}"
            f" MiB alone; raylet {four['raylet_pss'] / 2**30:.2f} GiB", "≤ 1.2×")
        targets.append(Target(f"Σ PSS of 4 concurrent LoRA jobs vs 1 on a 0.83B base"
                              f"{', activation checkpointing' if ckpt else ''}", "≤ 1.2×",
                              f"{four['total'] / one['total']:.2f}×", status(four["total"] / one["total"] <= 1.2),
                              why=limits(5)))

    # 6: data parallelism on 2 cores
    one = run_distributed(pretrain_job(work, general, "dp-1w", 1, 2, 80, 2.0, global_batch=16))
    tps = {"1w": steady_tokens_per_s(work, "dp-1w")}
    for zero in (2, 3):
        run_distributed(pretrain_job(work, general, f"dp-2w-z{zero}", 2, zero, 80, 1.0, global_batch=16))
        tps[f"z{zero}"] = steady_tokens_per_s(work, f"dp-2w-z{zero}")
        row(f"6. 2-worker ZeRO-{zero} vs 1 worker (tokens/s, global batch 16)", f"{tps[f'z{zero}'] / tps['1w']:.2f}",
            f"{tps[f'z{zero}']:,.0f} vs {tps['1w']:,.0f} tok/s", NO_TARGET)
    del one
    ray.shutdown()
    elapsed = time.time() - started
    write_results(elapsed, stamped)
    return 0


def notes() -> list[str]:
    """What limits each row: reasoning only; every number stays in the table of this run."""
    return """### What limits each row

1. The pretrain's own loop is the raw loop plus a few microseconds of bookkeeping per step
   (`stages/training/loop.py`). The DeepSpeed engine adds its per-step work (hooks, a fused step over
   flat buffers) that buys nothing with one worker, which is why one worker uses the plain
   engine. What remains for both is where Ray Train runs the training function: on a thread
   of the worker actor, not its main thread; when the main thread has run torch first,
   libgomp (torch's OpenMP) teams on two threads can outnumber the cores and each parallel
   region then pays a futex wake-up. On a GPU the host threads only launch kernels.
2. fp32 on 2 cores, small matrices (hidden 192): the per-op overhead of eager PyTorch, not
   the FLOPs, is what is left.
3. A cold first wave pays what a fan-out really pays once: starting each runner process,
   importing torch/transformers/peft, and loading the parent on a worker into the object
   store; warm dispatch then costs model construction on the mapped weights and the first
   step. A TorchTrainer pays a placement group, a worker process, imports and the process
   group for every job.
4. Jobs submitted at once; a runner that finishes takes the next queued job at once.
5. The base is held once, in the object store's shared memory; every runner maps it
   read-only, and PSS splits those shared pages among the processes that map them, so the
   sum counts the base once (the raylet's own PSS shows the store's pages are not charged
   to it). What grows with the number of jobs is each runner's private memory: its
   interpreter and libraries, activations, adapters, optimizer state and allocator slack.
   On this base that private part per job is a large fraction of the base itself, which is
   why the ratio misses the target; activation checkpointing shrinks only the activations.
6. (and row 1's 2-worker row) Two workers on two cores split the cores: one torch thread
   each instead of two in one process, and half the micro-batch each. gloo's reduce-scatter/all-gather of the gradients costs some of what that gains;
   ZeRO-3 also all-gathers parameters in every forward and backward. More workers only pay
   off with more cores or devices; on GPUs each worker has its own device.
""".splitlines()


def write_results(elapsed: float, stamped: str) -> None:
    lines = [f"`python benchmarks/run.py` on {time.strftime('%Y-%m-%d')}: {stamped}; "
             f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB; no GPU. "
             f"Took {elapsed / 60:.1f} minutes.", "",
             "Rule: each row's statistic is named in its raw numbers (rows 1: median of 3 alternating rounds; "
             "3: medians; 4, 5, 6: one run). Rows whose target is `-` have none.", "",
             "| benchmark | ratio | raw numbers | target |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    lines += ["", *notes(), "", *targets_table(targets)]  # the misses' whys point at the notes
    write_section("Suite: orchestration, fan-out, memory (benchmarks/run.py)", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--raw"]:
        print(raw_torch_tokens_per_s(sys.argv[2], int(sys.argv[3])))
        sys.exit(0)
    sys.exit(main())
