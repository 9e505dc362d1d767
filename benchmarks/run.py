"""The benchmark suite: every row a ratio measured side by side in this one run.

    python benchmarks/run.py            # ~10 minutes on 2 CPU cores; writes benchmarks/RESULTS.md

1. orchestration overhead: tokens/s of a 1-worker branchout pretrain (Ray Train; one worker
   trains with the plain torch engine, DeepSpeed having nothing to partition)
   vs a raw single-process torch loop, same model, batch, sequence length, threads (≥ 0.97)
2. MFU of that pretrain against this machine's measured fp32 matmul peak
3. per-job fan-out overhead, dispatch → first optimizer step: warm pool vs one TorchTrainer
   per domain (≤ 0.5 s, ≥ 20× better)
4. makespan of 16 small fine-tunes on 2 warm slots vs ideal = Σ job compute ÷ slots (≤ 1.1×)
5. memory held by 4 concurrent LoRA jobs vs 1 on a 0.83B base shared through the object store
   (≤ 1.2×), without and with activation checkpointing
6. 2-worker ZeRO-2 and ZeRO-3 vs 1 worker, same global batch (reported; 2 cores limit it)
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))

import corpus  # noqa: E402

# The quickstart's model: a 3.3M-parameter Llama.
MODEL = {"hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 4, "max_position_embeddings": 512}
SEQ, MICRO = 128, 8
rows: list[tuple[str, str, str, str]] = []  # (benchmark, ratio, raw numbers, target)


def row(name: str, ratio: str, raw: str, target: str) -> None:
    rows.append((name, ratio, raw, target))
    print(f"{name}: {ratio}   ({raw})   target {target}", flush=True)


def build_parts(work: Path):
    """A published tokenizer and packed data, as the pipeline's first two stages make them."""
    from branchout.orchestrator.spec import DatasetSpec
    from branchout.stages.checkpoint import publish_dir
    from branchout.stages.data import prepare
    from branchout.stages.tokenizer import tokenizer_hash, train_tokenizer

    corpus.build(str(work / "data"), {"general": 1_600_000, "legal": 300_000, "code": 300_000, "docs": 300_000})
    texts = [json.loads(x)["text"] for x in (work / "data" / "general.jsonl").read_text().splitlines()]
    train_tokenizer(texts, 4096, 2, str(work / "tok"))
    publish_dir(str(work / "tok"), str(work / "tokenizer"))
    h = tokenizer_hash(str(work / "tokenizer"))
    general = prepare(DatasetSpec(path=str(work / "data" / "general.jsonl")), str(work / "tokenizer"), h, SEQ,
                      0.1, 0, str(work / "cache"))
    legal = prepare(DatasetSpec(path=str(work / "data" / "legal.jsonl")), str(work / "tokenizer"), h, 32,
                    0.1, 0, str(work / "cache"))
    return general.uri, legal.uri


def pretrain_job(work: Path, data_uri: str, name: str, workers: int, zero: int, steps: int, cpus: float,
                 global_batch: int = MICRO):
    from branchout.orchestrator.spec import PretrainSpec
    from branchout.stages.job import TrainJob

    spec = PretrainSpec(dataset={"path": "unused"}, seq_len=SEQ, steps=steps, global_batch_size=global_batch,
                        micro_batch_size=global_batch // workers, num_workers=workers,
                        resources_per_worker={"cpu": cpus}, checkpoint_every=10**6, log_every=10,
                        schedule={"warmup_steps": 5}, deepspeed={"zero_stage": zero, "precision": "fp32"},
                        max_failures=0)
    return TrainJob(name=name, kind="pretrain", training=spec.model_dump(mode="json"), steps=steps,
                    model_type="llama", model_overrides=MODEL, tokenizer_uri=str(work / "tokenizer"),
                    data_uri=data_uri, out_uri=str(work / name), logs_uri=str(work / "logs"), run_id="bench")


def steady_tokens_per_s(work: Path, job: str) -> float:
    """Mean tokens/s of the logged windows after the first (start-up excluded)."""
    from branchout.stages.metrics import read_metrics

    points = [p["tokens_per_s"] for p in read_metrics(str(work / "logs"), job) if "tokens_per_s" in p]
    return statistics.mean(points[2:]) if len(points) > 3 else statistics.mean(points)


def raw_torch_tokens_per_s(data_uri: str, steps: int) -> float:
    """The same model, batch and threads in a bare torch loop: the ceiling."""
    import numpy as np
    import torch

    from branchout.orchestrator.spec import OptimizerSpec
    from branchout.stages.data import open_blocks
    from branchout.stages.model import build_config, build_model
    from branchout.stages.optim import build_optimizer

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


def finetune_job(work: Path, data_uri: str, name: str, steps: int, method: str = "full", base: str | None = None,
                 model: dict | None = None, activation_checkpointing: bool = False):
    from branchout.orchestrator.spec import FinetuneOptions
    from branchout.stages.job import TrainJob

    options = FinetuneOptions(method=method, steps=steps, seq_len=32, global_batch_size=4, micro_batch_size=4,
                              resources_per_worker={"cpu": 1}, schedule={"warmup_steps": 1},
                              checkpoint_every=10**6, deepspeed={"zero_stage": 0, "precision": "fp32"},
                              lora={"rank": 8, "alpha": 16}, activation_checkpointing=activation_checkpointing)
    return TrainJob(name=f"finetune/{name}", kind="finetune", training=options.model_dump(mode="json"),
                    steps=steps, model_type="llama", model_overrides=model or MODEL,
                    tokenizer_uri=str(work / "tokenizer"), data_uri=data_uri, out_uri=str(work / "ft" / name),
                    logs_uri=str(work / "logs"), run_id="bench", method=method, lora=options.lora.model_dump(),
                    base_model_uri=base or str(work / "base"))


def process_memory(pid: int) -> dict[str, int]:
    """Private (USS) and shared resident bytes of one process, from smaps_rollup."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0]) * 1024
    return {"private": fields["Private_Clean"] + fields["Private_Dirty"],
            "shared": fields["Shared_Clean"] + fields["Shared_Dirty"]}


def main() -> int:
    import ray

    from branchout.orchestrator.plan import ModelShape  # noqa: F401  (the FLOPs formula lives in Plan)
    from branchout.orchestrator.pool import WarmPool
    from branchout.orchestrator.training import run_distributed
    from branchout.stages.model import (
        build_config,
        build_model,
        export_model,
        parameter_counts,
        shared_base_weights,
    )
    from branchout.stages.tokenizer import load_tokenizer

    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="branchout-bench-"))
    general, legal = build_parts(work)
    tok = load_tokenizer(str(work / "tokenizer"))
    export_model(build_model(build_config("llama", MODEL, len(tok)), seed=0), tok, str(work / "base"))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="bench")

    # 1 + 2: orchestration overhead and MFU. This machine's throughput drifts by ±10% over
    # minutes (a shared host), so the two are measured alternately and the ratio taken per
    # round; the raw loop runs in a fresh process, as the Ray worker does.
    ratios, ours_runs, raw_runs = [], [], []
    for i in range(3):
        run_distributed(pretrain_job(work, general, f"pretrain-1w-{i}", 1, 0, 100, 2.0))
        ours_runs.append(steady_tokens_per_s(work, f"pretrain-1w-{i}"))
        raw_runs.append(float(subprocess.run([sys.executable, __file__, "--raw", general, "70"], check=True,
                                             capture_output=True, text=True).stdout.split()[-1]))
        ratios.append(ours_runs[-1] / raw_runs[-1])
    ours, raw = statistics.median(ours_runs), statistics.median(raw_runs)
    row("1. 1-worker pretrain vs raw torch loop (tokens/s)", f"{statistics.median(ratios):.3f}",
        f"median of 3 alternating rounds ({', '.join(f'{r:.3f}' for r in ratios)}); {ours:,.0f} vs {raw:,.0f} "
        f"tok/s; fp32, 2 threads, micro-batch {MICRO} × {SEQ}", "≥ 0.97")
    _, non_emb = parameter_counts(build_config("llama", MODEL, 4096))
    flops_per_token = 6 * non_emb + 12 * MODEL["num_hidden_layers"] * MODEL["hidden_size"] * SEQ
    peak = matmul_peak_flops()
    row("2. MFU of the 1-worker pretrain (CPU, fp32)", f"{ours * flops_per_token / peak:.1%}",
        f"{ours * flops_per_token / 1e9:.1f} GFLOP/s of {peak / 1e9:.0f} GFLOP/s measured 2048² matmul peak",
        "report")
    row("2. MFU on a GPU (bf16, ≥125M model)", "no GPU", "no accelerator was lent to this session", "report")

    # 3: per-job fan-out overhead, dispatch → first optimizer step
    trainer = []  # one TorchTrainer per job (before the pool holds the CPUs)
    for i in range(2):
        dispatched = time.time()
        r = run_distributed(pretrain_job(work, general, f"tt{i}", 1, 0, 2, 1.0))
        trainer.append(r["first_step_at"] - dispatched)
    trainer_s = statistics.median(trainer)
    pool = WarmPool({"CPU": 1.0}, 2, ray.put(shared_base_weights(str(work / "base"))))
    warmup = [pool.submit(finetune_job(work, legal, f"warm-{i}", 2)) for i in range(2)]
    [f.result() for f in warmup]
    warm = []
    for i in range(6):
        dispatched = time.time()
        r = pool.submit(finetune_job(work, legal, f"w{i}", 2)).result()
        warm.append(r["first_step_at"] - dispatched)
    warm_s = statistics.median(warm)
    row("3. fan-out overhead: warm pool vs TorchTrainer per job", f"{trainer_s / warm_s:.0f}× better",
        f"{warm_s:.3f} s vs {trainer_s:.1f} s dispatch → first step (median)", "≤ 0.5 s, ≥ 20×")

    # 4: makespan of 16 small fine-tunes on 2 slots
    t0 = time.time()
    results = [f.result() for f in [pool.submit(finetune_job(work, legal, f"m{i}", 20)) for i in range(16)]]
    makespan = max(r["ended"] for r in results) - t0
    ideal = sum(r["ended"] - r["started"] for r in results) / 2
    row("4. makespan of 16 fine-tunes on 2 slots vs ideal", f"{makespan / ideal:.2f}×",
        f"{makespan:.1f} s vs {ideal:.1f} s = Σ job time ÷ 2", "≤ 1.1×")
    pool.shutdown()

    # 5: memory of 4 concurrent LoRA jobs vs 1 on a 0.83B-parameter (3.1 GiB fp32) base, per
    # process: what each runner holds privately beyond its idle self, plus the base once
    # (the object store's pages, mapped shared into every runner). What a job holds itself
    # (activations, allocator slack, adapters) grows with tokens × width × depth and the base
    # with width² × depth, so the ratio falls as models grow; the raw numbers give both parts.
    big = {"hidden_size": 2048, "intermediate_size": 5504, "num_hidden_layers": 16, "num_attention_heads": 16,
           "num_key_value_heads": 16, "max_position_embeddings": 128}
    export_model(build_model(build_config("llama", big, len(tok)), seed=0), tok, str(work / "bigbase"))
    base_ref = ray.put(shared_base_weights(str(work / "bigbase")))
    base_bytes = sum(v.nbytes for v in ray.get(base_ref).values())
    for label, ckpt in (("", False), (", activation checkpointing", True)):
        held, per_job, shared = {}, {}, {}
        for k in (1, 4):
            pool = WarmPool({"CPU": 0.5}, k, base_ref)
            pids = [ray.get(a.ready.remote()) for a in list(pool._idle)]
            time.sleep(2)
            idle = [process_memory(pid) for pid in pids]
            futures = [pool.submit(finetune_job(work, legal, f"lora{k}{ckpt}-{i}", 10_000, "lora",
                                                str(work / "bigbase"), big, activation_checkpointing=ckpt))
                       for i in range(k)]
            busy = [process_memory(pid) for pid in pids]
            for _ in range(20):  # the peak of each runner over ~40 s of training (steps take seconds)
                time.sleep(2)
                busy = [max(b, process_memory(pid), key=lambda m: m["private"]) for b, pid in zip(busy, pids, strict=True)]
            assert not any(f.done() for f in futures), "a LoRA job ended before its memory was measured"
            pool.shutdown()  # the jobs' results are not needed, only what they held
            private = [b["private"] - i["private"] for b, i in zip(busy, idle, strict=True)]
            shared[k] = min(b["shared"] for b in busy)
            per_job[k] = statistics.mean(private)
            held[k] = sum(private) + base_bytes
            time.sleep(3)
        row(f"5. memory of 4 concurrent LoRA jobs vs 1 (shared base{label})", f"{held[4] / held[1]:.2f}×",
            f"{held[4] / 2**30:.2f} GiB vs {held[1] / 2**30:.2f} GiB = base {base_bytes / 2**30:.2f} GiB once "
            f"(mapped shared in every runner: ≥ {shared[4] / 2**30:.2f} GiB each) + {per_job[4] / 2**20:.0f} MiB "
            f"private per job; unshared it would be {(4 * (base_bytes + per_job[4])) / held[1]:.1f}×", "≤ 1.2×")

    # 6: data parallelism on 2 cores
    one = run_distributed(pretrain_job(work, general, "dp-1w", 1, 2, 80, 2.0, global_batch=16))
    tps = {"1w": steady_tokens_per_s(work, "dp-1w")}
    for zero in (2, 3):
        run_distributed(pretrain_job(work, general, f"dp-2w-z{zero}", 2, zero, 80, 1.0, global_batch=16))
        tps[f"z{zero}"] = steady_tokens_per_s(work, f"dp-2w-z{zero}")
        row(f"6. 2-worker ZeRO-{zero} vs 1 worker (tokens/s, global batch 16)", f"{tps[f'z{zero}'] / tps['1w']:.2f}",
            f"{tps[f'z{zero}']:,.0f} vs {tps['1w']:,.0f} tok/s", "report")
    row("6. NCCL 1-GPU DeepSpeed smoke", "no GPU", "no accelerator was lent to this session", "report")
    del one
    ray.shutdown()
    elapsed = time.time() - started
    write_results(elapsed)
    return 0


NOTES = """## What limits each row

1. The pretrain's own loop is the raw loop plus a few microseconds of bookkeeping per step
   (`stages/loop.py`), and one worker trains with the plain torch engine (ZeRO has nothing
   to partition; with DeepSpeed for the one worker an earlier run of this suite gave 0.955).
   What remains is where Ray Train runs the training function: on a thread of the worker
   actor, not its main thread. In a plain actor, a training loop on a second thread ran
   16-25% slower whenever the main thread had run torch first, and at parity when it was
   the only thread using torch; `GOMP_SPINCOUNT=0` makes the fast case equally slow, which
   points at libgomp (torch's OpenMP) throttling its spin-wait once OpenMP teams on two
   threads outnumber the cores, so each parallel region pays a futex wake-up. On this
   2-core host that appears in some runs and not others (earlier runs of this suite gave
   1.02 and 1.15), and the host's throughput drifts by ±10% over minutes, hence the
   alternating rounds. With a GPU the host threads only launch kernels.
2. fp32 on 2 cores, small matrices (hidden 192): the per-op overhead of eager PyTorch,
   not the FLOPs, is what is left. A GPU row needs a lent GPU.
3. A warm runner has torch, transformers, peft and the tokenizer loaded and the parent's
   weights mapped; a job costs model construction on those weights and its first step.
   A TorchTrainer pays a placement group, a worker process, imports and the process group.
4. The pool hands a finished runner its next job at once; what is left is the callback hop.
5. The base is held once (the object store's pages, mapped read-only and shared into
   every runner); what each job adds is its activations, adapters, optimizer state and
   allocator slack, which grow with tokens × width × depth, while the base grows with
   width² × depth. Activation checkpointing (`activation_checkpointing: true`) cuts the
   per-job part by ~60% and is what meets the target on this 0.83B base (1.40× without).
6. Two workers on two cores split the cores: one torch thread each instead of two in one
   process. For a model this small two single-threaded processes gain about what the
   OpenMP synchronisation of every op costs one two-threaded process, and gloo's
   reduce-scatter/all-gather of the gradients takes some of it back: ZeRO-2 ≈ 1. ZeRO-3
   also all-gathers parameters in every forward and backward, hence lower. More workers
   only pay off with more cores or devices; on GPUs each worker has its own device.
"""


def write_results(elapsed: float) -> None:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    lines = ["# Benchmark results", "",
             f"`python benchmarks/run.py` on {time.strftime('%Y-%m-%d')}: {os.cpu_count()} cores ({cpu}), "
             f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, Python "
             f"{platform.python_version()}, {torch_version()}; no GPU. Took {elapsed / 60:.1f} minutes.", "",
             "| benchmark | ratio | raw numbers | target |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    lines += ["", NOTES]
    (REPO / "benchmarks" / "RESULTS.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def torch_version() -> str:
    out = subprocess.run([sys.executable, "-c", "import torch, ray, deepspeed; print(f'torch {torch.__version__}, "
                          "ray {ray.__version__}, deepspeed {deepspeed.__version__}')"], capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]  # DeepSpeed prints an accelerator warning first


if __name__ == "__main__":
    if sys.argv[1:2] == ["--raw"]:
        print(raw_torch_tokens_per_s(sys.argv[2], int(sys.argv[3])))
        sys.exit(0)
    sys.exit(main())
