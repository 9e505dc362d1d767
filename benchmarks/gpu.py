"""The GPU rows: what each speed switch buys, and the product's fine-tune, packing, evaluation
and export paths, on one GPU machine.

    python benchmarks/gpu.py            # ~7 minutes on one H100/H200; replaces its section of RESULTS.md
    python benchmarks/gpu.py --smoke    # the same code, tiny, on the CPU: checks the script, writes nothing

Every training row runs the product's own Ray Train worker function
(``stages.training.distributed.train_worker``, i.e. the recipe a pipeline's pretrain runs) in a
fresh Ray Train worker, and reads its throughput from the job's own metrics log: the median
tokens/s of the log windows after the first third of the steps (the compile, warmup and
allocator growth are in the first windows). Rule fixed before measuring: one run per row,
median of its steady windows.

1. pretrain of a 171M-parameter Llama in bf16 (seq 1024, 32 blocks per step), ablation, each
   row adding one switch to the one above: eager with torch's multi-tensor AdamW at
   micro-batch 8; + fused AdamW (``optimizer.fused``); + ``torch.compile`` of each layer
   (``compile``); + Liger's fused kernels (``fused_kernels``, only where liger-kernel is
   installed); + the micro-batch the memory planner picks for this GPU
   (``cluster.gpu_memory.largest_micro_batch``). MFU counts 6·N + 12·L·H·T FLOPs per token
   (N: non-embedding parameters) against the bf16 matmul rate measured in the same run.
   A raw torch loop (eager, micro-batch 8) is the reference of earlier runs.
2. fine-tunes of that base at the same settings: LoRA and full (tokens/s, MFU; a LoRA step
   computes no weight gradients of the frozen base: 4·N + 12·L·H·T FLOPs per token).
3. 4 LoRA fine-tunes packed on one GPU (``gpu: 0.25`` each) through the warm pool
   (``PoolSet``) against one alone.
4. evaluation on the GPU (``evaluate_domain`` as the driver submits it): tokens/s scored.
5. export and reload: the pretrain's bf16 export loaded with ``from_pretrained``.
6. DeepSpeed ZeRO-2 and ZeRO-3 on the ``cpu:gloo,cuda:nccl`` group, one rank, with the
   defaults (fused AdamW on the GPU): that the paths run, and their throughput.

Each row is printed as it is measured and a failing row is reported as failed; the table is
written at the end, stamped with commit, GPU and library versions, and ends with the targets
(bf16 MFU ≥ 45% on the last pretrain row; the 4 packed LoRA fine-tunes < 4× one alone), each met,
missed or not measured (its row failed or did not run). Without a GPU nothing is measured: the
targets are written as not measured, and the last GPU run's rows are kept under a line that says
they are stale (never erased).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SECTION = "GPU rows (benchmarks/gpu.py)"
sys.path.insert(0, str(REPO / "examples"))
sys.path.insert(0, str(REPO / "benchmarks"))

from results import Target, sections, stamp, status, targets_table, unsealed, write_section  # noqa: E402

FULL = {"model": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 12, "num_attention_heads": 16,
                  "num_key_value_heads": 16, "max_position_embeddings": 1024},
        "vocab": 8192, "seq": 1024, "batch": 32, "micro": 8, "steps": 60, "log_every": 10,
        "finetune_steps": 40, "pack_steps": 20, "zero_steps": 30, "text": 3_000_000, "gpu_gb": None}
SMOKE = {"model": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                   "num_key_value_heads": 2, "max_position_embeddings": 128},
         "vocab": 512, "seq": 64, "batch": 8, "micro": 2, "steps": 12, "log_every": 2,
         "finetune_steps": 6, "pack_steps": 3, "zero_steps": 4, "text": 200_000, "gpu_gb": 1.0}
STEADY = 1 / 3  # the log windows ending in the first third of the steps are not timed


def raw_loop(model_cfg: dict, vocab: int, data_uri: str, seq: int, micro: int, steps: int) -> float:
    """A bare torch loop, same model, micro-batch, precision and optimizer: tokens/s."""
    import numpy as np
    import torch

    from branchout.core.spec import OptimizerSpec
    from branchout.stages.prepare.data import open_blocks
    from branchout.stages.training.model import build_config, build_model
    from branchout.stages.training.optim import build_optimizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(build_config("llama", model_cfg, vocab), seed=0).to(device)
    opt = build_optimizer(model, OptimizerSpec())
    blocks = np.asarray(open_blocks(data_uri, "train"))
    skip = int(steps * STEADY)
    for step in range(steps):
        if step == skip:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        rows = np.arange(step * micro, (step + 1) * micro) % len(blocks)
        batch = torch.from_numpy(blocks[rows].astype(np.int64)).to(device)
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return (steps - skip) * micro * seq / (time.perf_counter() - start)


def matmul_peak() -> float:
    import torch

    device, n = ("cuda", 8192) if torch.cuda.is_available() else ("cpu", 1024)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    if device == "cuda":
        torch.cuda.synchronize()
    start, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ a
    if device == "cuda":
        torch.cuda.synchronize()
    return reps * 2 * n**3 / (time.perf_counter() - start)


def prepare_parts(work: Path, size: dict) -> dict:
    """Tokenizer, packed general and legal text (the product's data stage), as the pipeline makes them."""
    from branchout.core.spec import DatasetSpec
    from branchout.stages.job import DataJob
    from branchout.stages.prepare.data import prepare
    from branchout.stages.prepare.tokenizer import tokenizer_hash, train_tokenizer
    from branchout.storage.checkpoint import publish_dir

    import corpus

    corpus.build(str(work / "data"), {"general": size["text"], "legal": size["text"] // 4, "code": 10_000,
                                      "docs": 10_000})
    texts = [json.loads(x)["text"] for x in (work / "data" / "general.jsonl").read_text().splitlines()]
    train_tokenizer(texts, size["vocab"], 2, str(work / "tok"))
    publish_dir(str(work / "tok"), str(work / "tokenizer"))
    h = tokenizer_hash(str(work / "tokenizer"))
    packed = {name: prepare(DataJob(dataset=DatasetSpec(path=str(work / "data" / f"{name}.jsonl")),
                                    tokenizer_uri=str(work / "tokenizer"), tokenizer_hash=h,
                                    seq_len=size["seq"], heldout_fraction=0.05, split_seed=0,
                                    cache_root=str(work / "cache"))).uri for name in ("general", "legal")}
    return {"tokenizer": str(work / "tokenizer"), **packed}


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def training(size: dict, micro: int, steps: int, **switches):
    """The training section of a row: bf16, one worker with a GPU, the switches as given."""
    return {"seq_len": size["seq"], "steps": steps, "global_batch_size": size["batch"], "micro_batch_size": micro,
            "num_workers": 1, "resources_per_worker": {"cpu": 2, "gpu": 1 if _has_gpu() else 0},
            "schedule": {"warmup_steps": 5}, "checkpoint_every": 10**6, "log_every": size["log_every"],
            "deepspeed": {"zero_stage": switches.pop("zero", 0), "precision": "bf16",
                          "engine": switches.pop("engine", "auto")},
            "optimizer": {"fused": switches.pop("fused", "auto")}, **switches}


def pretrain_job(work: Path, parts: dict, size: dict, name: str, micro: int, steps: int, **switches):
    from branchout.core.spec import PretrainSpec
    from branchout.stages.job import TrainJob

    t = PretrainSpec(dataset={"path": "unused"}, **training(size, micro, steps, **switches))
    return TrainJob(name=name, kind="pretrain", training=t, steps=steps, model_type="llama",
                    model_overrides=size["model"], tokenizer_uri=parts["tokenizer"], data_uri=parts["general"],
                    out_uri=str(work / name), logs_uri=str(work / "logs"), run_id="bench")


def finetune_job(work: Path, parts: dict, size: dict, name: str, base_uri: str, method: str, micro: int,
                 steps: int, gpu: float = 1.0, **switches):
    from branchout.core.spec import FinetuneOptions
    from branchout.stages.job import TrainJob

    section = training(size, micro, steps, **switches)
    section["resources_per_worker"] = {"cpu": 2, "gpu": gpu if _has_gpu() else 0}
    o = FinetuneOptions(method=method, lora={"rank": 16, "alpha": 32}, **section)
    return TrainJob(name=f"finetune/{name}", kind="finetune", training=o, steps=steps, model_type="llama",
                    model_overrides=size["model"], tokenizer_uri=parts["tokenizer"], data_uri=parts["legal"],
                    out_uri=str(work / name), logs_uri=str(work / "logs"), run_id="bench", method=method,
                    base_model_uri=base_uri)


def run_training(job) -> dict:
    """``job`` through the product's Ray Train worker function, in a fresh worker; its result and
    steady-state tokens/s (median of the log windows past the first third of its steps)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from branchout.orchestrator.run.ray_train import process_group_backend
    from branchout.stages.training.distributed import train_worker
    from branchout.stages.training.metrics import read_metrics

    gpu = _has_gpu()
    started = time.time()
    trainer = TorchTrainer(train_worker, train_loop_config={"job": job},
                           torch_config=TorchConfig(backend=process_group_backend(gpu)),
                           scaling_config=ScalingConfig(num_workers=1, use_gpu=gpu, resources_per_worker={"CPU": 2}),
                           run_config=RunConfig(name=job.slug, storage_path=str(Path(job.out_uri).parent / "ray")))
    trainer.fit()
    wall = time.time() - started
    result = json.loads(Path(job.out_uri, "result.json").read_text())
    windows = [m["tokens_per_s"] for m in read_metrics(job.logs_uri, job.name)
               if "tokens_per_s" in m and m["step"] > job.steps * STEADY]
    return {**result, "steady_tokens_per_s": statistics.median(windows), "windows": len(windows), "wall_s": wall,
            "first_step_s": result["first_step_at"] - result["started"] if result.get("first_step_at") else None}


T0 = time.time()


def note(what: str) -> None:
    print(f"[{time.time() - T0:6.1f} s] {what}", flush=True)


class Rows(list):
    """The table so far; each row is printed as it is measured and, on a GPU, the section is
    rewritten with it (marked incomplete until the end), so a run cut short keeps its rows."""

    def __init__(self, write=None):
        super().__init__()
        self.write = write

    def append(self, row: tuple[str, str, str, str]) -> None:
        super().append(row)
        name, ratio, raw, target = row
        print(f"ROW {name}: {ratio}   ({raw})   target {target}", flush=True)
        if self.write:
            self.write(self, {}, done=False)

    def attempt(self, name: str, target: str, measure) -> object | None:
        """Run ``measure()`` (which appends its row); a failure becomes a row saying so."""
        try:
            return measure()
        except Exception as e:  # a row that fails on this machine is a result too
            traceback.print_exc()
            self.append((name, "failed", f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}",
                         target))
            return None


def measure(size: dict, write=None) -> tuple[list, dict]:
    import ray
    import torch

    from branchout.cluster.gpu_memory import ZeroOption, largest_micro_batch
    from branchout.orchestrator.run.fanout import submit_task
    from branchout.orchestrator.run.pool import PoolSet
    from branchout.stages.job import Candidate, EvalJob
    from branchout.stages.training.kernels import liger_installed
    from branchout.stages.training.model import build_config, meta_model, parameter_counts

    work = Path(tempfile.mkdtemp(prefix="branchout-gpu-"))
    parts = prepare_parts(work, size)
    note("corpus, tokenizer and packed data ready")
    gpu = _has_gpu()
    ray.init(address="local", include_dashboard=False, log_to_driver=True, namespace="bench-gpu")
    config = build_config("llama", size["model"], size["vocab"])
    params, non_emb = parameter_counts(config)
    m = size["model"]
    attention = 12 * m["num_hidden_layers"] * m["hidden_size"] * size["seq"]
    flops = 6 * non_emb + attention
    peak = matmul_peak()
    note(f"bf16 matmul {peak / 1e12:.0f} TFLOP/s")
    facts = {"peak": peak, "params": params}
    rows = Rows(None if write is None else lambda r, _, done: write(r, facts, done))

    def mfu(tok_s: float, per_token: float = flops) -> str:
        return f"{tok_s * per_token / peak:.1%}"

    def raw_row():
        raw = raw_loop(m, size["vocab"], parts["general"], size["seq"], size["micro"], size["steps"])
        rows.append((f"1. raw torch loop (eager, foreach AdamW, micro-batch {size['micro']})", mfu(raw), f"{raw:,.0f} tok/s", "report"))

    rows.attempt("1. raw torch loop", "report", raw_row)

    largest = max(sum(p.numel() for p in mod.parameters(recurse=False)) for mod in meta_model(config, 2).modules())
    gpu_gb = size["gpu_gb"] or torch.cuda.get_device_properties(0).total_memory / 1e9
    planned = largest_micro_batch(ZeroOption(0), params, largest, 1, size["seq"], size["batch"], m["hidden_size"],
                                  m["num_hidden_layers"], size["vocab"], gpu_gb) or size["micro"]
    ablation = [
        (f"eager: foreach AdamW, no compile, micro-batch {size['micro']}", size["micro"],
         {"fused": False, "compile": False, "fused_kernels": False}),
        ("+ fused AdamW (optimizer.fused)", size["micro"], {"fused": True, "compile": False, "fused_kernels": False}),
        ("+ torch.compile per layer (compile)", size["micro"], {"fused": True, "compile": True, "fused_kernels": False}),
    ]
    if liger_installed() and gpu:  # not a dependency: measured where it is installed
        ablation.append(("+ Liger kernels (fused_kernels: true; not kept below)", size["micro"],
                         {"fused": True, "compile": True, "fused_kernels": True}))
    ablation.append((f"+ micro-batch {planned} (the planner's largest for {gpu_gb:.0f} GB)", planned,
                     {"fused": True, "compile": True, "fused_kernels": False}))
    previous = None
    best = None
    facts["mfu_row"] = f"1. pretrain {ablation[-1][0]}"  # the MFU target's row
    for i, (label, micro, switches) in enumerate(ablation):
        name = f"1. pretrain {label}"

        def row(i=i, label=label, micro=micro, switches=switches, name=name):
            nonlocal previous, best
            r = run_training(pretrain_job(work, parts, size, f"pre{i}", micro, size["steps"], **switches))
            tok = r["steady_tokens_per_s"]
            share = f"{tok / previous:.2f}× the row above; " if previous else ""
            last = i == len(ablation) - 1
            rows.append((name, mfu(tok), f"{tok:,.0f} tok/s; {share}first step {r['first_step_s']:.1f} s (compile "
                         f"included); peak {r.get('peak_gpu_gib', 0):.1f} GiB; kernels {r['kernels']}",
                         "≥ 45%" if last else "report"))
            if not switches["fused_kernels"]:  # the Liger row is a side branch: the next row compares to its parent
                previous = tok
            best = r
            if last:
                facts["mfu"] = tok * flops / peak
        rows.attempt(name, "report", row)
    note("pretrain ablation done")
    base = best["model_uri"] if best else None
    facts["micro"] = planned
    if base is None:
        return rows, facts

    lora_flops = 4 * non_emb + attention
    for method, per_token in (("lora", lora_flops), ("full", flops)):
        name = f"2. fine-tune ({method}) of the 171M base, micro-batch {planned}, compile"

        def ft(method=method, per_token=per_token, name=name):
            r = run_training(finetune_job(work, parts, size, f"ft-{method}", base, method, planned,
                                          size["finetune_steps"], compile=True))
            tok = r["steady_tokens_per_s"]
            rows.append((name, mfu(tok, per_token), f"{tok:,.0f} tok/s; first step {r['first_step_s']:.1f} s; "
                         f"kernels {r['kernels']}", "report"))
        rows.attempt(name, "report", ft)

    def packing():
        jobs = [finetune_job(work, parts, size, f"pack{i}", base, "lora", size["micro"], size["pack_steps"], gpu=0.25)
                for i in range(5)]
        bundle = {"CPU": 2.0, "GPU": 0.25} if gpu else {"CPU": 0.5}
        # Each side in its own PoolSet, cold as a fan-out starts: a pool's width is set by its
        # first submission, so one shared with the lone job would run the four one at a time.
        pools = PoolSet(base, max_concurrent=None, fixed_cluster=True)
        started = time.time()
        pools.submit(jobs[0], bundle, 1).result()
        single = time.time() - started  # like the makespan: the runner's cold start included
        pools.shutdown()
        pools = PoolSet(base, max_concurrent=None, fixed_cluster=True)
        started = time.time()
        packed = [f.result() for f in [pools.submit(j, bundle, 4 - i) for i, j in enumerate(jobs[1:])]]
        makespan = time.time() - started
        pools.shutdown()
        spans = [(r["started"], r["ended"]) for r in packed]
        together = max(sum(a <= t < b for a, b in spans) for t, _ in spans)
        facts["packed"] = makespan / single
        rows.append((f"{facts['packing_row']} (gpu: 0.25) vs one alone", f"{makespan / single:.2f}×",
                     f"makespan {makespan:.1f} s vs {single:.1f} s alone; {together} ran at once", "< 4×"))
        return jobs[0]

    facts["packing_row"] = "3. 4 LoRA fine-tunes packed on one GPU"
    lone = rows.attempt(facts["packing_row"], "< 4×", packing)

    def evaluation():
        from branchout.stages.evaluation.evaluate import evaluate_domain

        candidates = {"base": Candidate(base)}
        if lone is not None:
            candidates["finetuned"] = Candidate(lone.model_uri, base)
        job = EvalJob(domain="legal", data_uri=parts["legal"], candidates=candidates, batch_size=8, max_blocks=256,
                      threads=2, precision="bf16", use_gpu=gpu, tokenizer_uri=None, generation_samples=0,
                      max_new_tokens=0)
        eval_bundle = {"CPU": 2.0, "GPU": 1.0} if gpu else {"CPU": 1.0}
        r = submit_task(evaluate_domain, (job,), eval_bundle, "evaluate/legal", None).result()
        seconds = r["ended"] - r["started"]
        ppl = ", ".join(f"{k[:-4]} {v:.1f}" for k, v in r.items() if k.endswith("_ppl"))
        rows.append(("4. evaluation on the GPU (bf16)", f"{len(candidates) * r['heldout_tokens'] / seconds:,.0f} tok/s",
                     f"{seconds:.1f} s for {len(candidates)} × {r['heldout_tokens']:,} tokens, task start and model "
                     f"loads included; ppl {ppl}", "report"))

    rows.attempt("4. evaluation on the GPU", "report", evaluation)

    def export():
        from transformers import AutoModelForCausalLM

        from branchout.stages.evaluation.evaluate import perplexity
        from branchout.stages.prepare.data import open_blocks

        files = list(Path(base).glob("*.safetensors"))
        size_bytes = sum(f.stat().st_size for f in files)
        reloaded = AutoModelForCausalLM.from_pretrained(base).to("cuda" if gpu else "cpu")  # the dtype it was saved in
        ppl, _ = perplexity(reloaded, open_blocks(parts["legal"], "heldout"), 8, 64)
        rows.append(("5. pretrain export (plain engine, bf16 safetensors), reloaded", f"{size_bytes / (4 * params):.2f} of fp32",
                     f"{size_bytes / 2**30:.2f} GiB in {len(files)} file(s); reloaded as {reloaded.dtype}; held-out "
                     f"legal ppl {ppl:.1f}", "0.5"))

    rows.attempt("5. export reload", "0.5", export)

    for zero in (2, 3):
        name = f"6. pretrain DeepSpeed ZeRO-{zero}, 1 rank on cpu:gloo,cuda:nccl, micro-batch {planned}, defaults"

        def ds(zero=zero, name=name):
            r = run_training(pretrain_job(work, parts, size, f"zero{zero}", planned, size["zero_steps"],
                                          engine="deepspeed", zero=zero))
            tok = r["steady_tokens_per_s"]
            rows.append((name, mfu(tok), f"{tok:,.0f} tok/s; kernels {r['kernels']}", "report"))
        rows.attempt(name, "report", ds)
    ray.shutdown()
    return rows, facts


MFU_TARGET = "bf16 MFU of the 171M pretrain with the product's switches on (the last pretrain row)", "≥ 45%"
PACKING_TARGET = "4 LoRA fine-tunes packed on one GPU (gpu: 0.25), makespan vs one alone", "< 4×"


def gpu_targets(rows: list, facts: dict, done: bool, gpu: bool = True) -> list[Target]:
    """The targets from the rows measured so far: one whose row failed, or has not run yet, or
    that needs a GPU where there is none, is not measured."""
    if not gpu:
        return [Target(*t, None, "not measured", why="no GPU on this machine") for t in (MFU_TARGET, PACKING_TARGET)]

    def unmeasured(row: str | None, unreached: str) -> str:
        failed = next((r for r in rows if row and r[0].startswith(row) and r[1] == "failed"), None)
        if failed:
            return f"its row failed: {failed[2]}"
        return unreached if done else "the run ended before its row"

    mfu, packed = facts.get("mfu"), facts.get("packed")
    return [Target(*MFU_TARGET, None, "not measured", why=unmeasured(facts.get("mfu_row"), "its row did not run"))
            if mfu is None else
            Target(*MFU_TARGET, f"{mfu:.1%}", status(mfu >= 0.45), why=f"{mfu:.1%}, below 45%"),
            Target(*PACKING_TARGET, None, "not measured",
                   why=unmeasured(facts.get("packing_row"), "not run: no pretrain row produced a base to fine-tune"))
            if packed is None else
            Target(*PACKING_TARGET, f"{packed:.2f}×", status(packed < 4), why=f"{packed:.2f}×, not under 4×")]


STALE = "**Stale:**"
NOTES = "Notes written by people about these runs: [docs/gpu-runs.md](../docs/gpu-runs.md)."


def stale_section(body: list[str], table: list[str]) -> list[str]:
    """The GPU section after a run that found no GPU: the last measured rows kept as that run
    wrote them (its own stamp says what they measured), under a line saying they are stale,
    and this run's targets, not measured. An earlier stale line and table are replaced."""
    rows, _ = unsealed(body)
    if rows and rows[0].startswith(STALE):
        rows = rows[1:]
    if "| target | measured | status |" in rows:  # this run's table replaces the last one
        rows = rows[:rows.index("| target | measured | status |")]
    rows = [r for r in rows if r != NOTES and not r.startswith("The notes written by hand about this run")]
    while rows and not rows[-1].strip():
        rows = rows[:-1]
    return [f"{STALE} `python benchmarks/gpu.py` on {time.strftime('%Y-%m-%d')} found no GPU ({stamp()}): the rows "
            "below are the last GPU run's, kept as it wrote them; they measure the commit their own stamp names, "
            "not this one.", "", *rows, "", NOTES, "", *table]


def main() -> int:
    import torch

    smoke = "--smoke" in sys.argv
    if not torch.cuda.is_available() and not smoke:
        table = targets_table(gpu_targets([], {}, done=True, gpu=False))
        if SECTION in sections():  # a measured GPU section is kept, marked stale, never erased
            write_section(SECTION, stale_section(sections()[SECTION], table))
            print("no GPU on this machine: nothing measured; RESULTS.md's GPU rows kept, marked stale")
        else:
            write_section(SECTION, [f"`python benchmarks/gpu.py` on {time.strftime('%Y-%m-%d')}: no GPU on this "
                                    f"machine, nothing measured; {stamp()}.", "", *table])
            print("no GPU on this machine: nothing measured; RESULTS.md's GPU section says so")
        print("\n".join(table))
        return 0
    started = time.time()
    if smoke:
        rows, facts = measure(SMOKE)
        failed = [r for r in rows if r[1] == "failed"]
        print("\n".join(targets_table(gpu_targets(rows, facts, done=True))))
        print(f"--smoke: the script ran end to end on the CPU, {len(rows)} rows, {len(failed)} failed; nothing written")
        return 1 if failed else 0

    def write(rows: list, facts: dict, done: bool) -> None:
        device = torch.cuda.get_device_name()
        took = f"{(time.time() - started) / 60:.1f} minutes" if done else "INCOMPLETE: the run ended before its last row"
        body = [f"`python benchmarks/gpu.py` on {time.strftime('%Y-%m-%d')}, {took}: 1 × {device}; {stamp()}. "
                f"bf16 matmul measured in the run: {facts['peak'] / 1e12:.0f} TFLOP/s (the MFU denominator). Model: "
                f"{facts['params'] / 1e6:.0f}M-parameter Llama, seq 1024, 32 blocks per step. Throughput: the median "
                "of the job's own logged tokens/s windows after the first third of its steps; one run per row.", "",
                "| benchmark | MFU / ratio | raw numbers | target |", "|---|---|---|---|"]
        body += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
        body += ["", *targets_table(gpu_targets(rows, facts, done))]
        write_section(SECTION, body)

    rows, facts = measure(FULL, write)
    write(rows, facts, done=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
