"""The GPU rows: the product's training, fan-out, evaluation and export paths on one GPU machine.

    python benchmarks/gpu.py            # ~4 minutes on one H100; replaces its section of RESULTS.md
    python benchmarks/gpu.py --after-pretrain   # rows 2-4 only (the ZeRO-3 run is their base): ~2.5 minutes
    python benchmarks/gpu.py --smoke    # the same code, tiny, on the CPU: checks the script, measures nothing

1. pretrain of a 171M-parameter Llama in bf16 (seq 1024, micro-batch 8) under Ray Train on
   one GPU: the plain engine (what one worker runs), DeepSpeed ZeRO-2 and ZeRO-3 on a
   ``cpu:gloo,cuda:nccl`` process group (``orchestrator.run.ray_train.process_group_backend``),
   side by side with a raw torch loop; tokens/s and MFU (6·N + 12·L·H·T FLOPs per token)
   against the measured bf16 matmul peak. The ZeRO-3 model is built under ``zero.Init``.
2. 4 LoRA fine-tunes of that base packed on one GPU (``gpu: 0.25`` each) through the warm
   pool (``PoolSet``): how many ran at once, makespan against one job alone.
3. evaluation on the GPU (``evaluate_domain`` as the driver submits it): tokens/s scored.
4. export and reload: the ZeRO-3 export (bf16 sharded safetensors) loaded back with
   ``from_pretrained``: dtype, size against fp32, held-out perplexity.

On a machine without a GPU it says so, writes that the GPU rows were not measured, and
exits 0.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SECTION = "GPU rows (benchmarks/gpu.py)"
sys.path.insert(0, str(REPO / "examples"))
sys.path.insert(0, str(REPO / "benchmarks"))

from results import write_section  # noqa: E402

FULL = {"model": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 12, "num_attention_heads": 16,
                  "num_key_value_heads": 16, "max_position_embeddings": 1024},
        "vocab": 8192, "seq": 1024, "micro": 8, "steps": 100, "lora_steps": 40, "text": 3_000_000}
SMOKE = {"model": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                   "num_key_value_heads": 2, "max_position_embeddings": 128},
         "vocab": 512, "seq": 64, "micro": 2, "steps": 8, "lora_steps": 3, "text": 200_000}
WARMUP = 0.25  # share of each run's steps left out of its throughput


def train_loop(config: dict) -> None:
    """Ray Train worker: the product's model construction, engine, loop and export."""
    import numpy as np
    import torch

    from branchout.stages.prepare.data import open_blocks
    from branchout.stages.prepare.tokenizer import load_tokenizer
    from branchout.stages.training.engine import DeepSpeedEngine, TorchEngine
    from branchout.stages.training.loop import run_steps
    from branchout.stages.training.model import export_model, prepare_model, zero3_config

    job = config["job"]
    t = job.spec()
    use_gpu = torch.cuda.is_available()
    tok = load_tokenizer(job.tokenizer_uri)
    if config["engine"] == "torch":
        engine = TorchEngine(prepare_model(job, tok), t, job.steps, device="cuda" if use_gpu else "cpu")
    else:
        model = prepare_model(job, tok, zero3_config=zero3_config(job, tok, 1, use_gpu))
        engine = DeepSpeedEngine(model, t, job.steps, 1, use_gpu)
    blocks = np.asarray(open_blocks(job.data_uri, "train"))
    times: list[float] = []
    run_steps(engine, blocks, t, job.steps, 0, 0, 1, None, lambda step, loss: None,
              after_step=lambda step: times.append(time.perf_counter()))
    if use_gpu:
        torch.cuda.synchronize()
    times[-1] = time.perf_counter()  # the last step is read, so it has finished by now
    skip = int(len(times) * WARMUP)
    out = {"tokens_per_s": (len(times) - 1 - skip) * t.global_batch_size * t.seq_len / (times[-1] - times[skip]),
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if use_gpu else 0.0}
    started = time.perf_counter()
    if isinstance(engine, DeepSpeedEngine):
        engine.release_optimizer_state()
    weights = engine.state_dict_for_export()
    if isinstance(engine, DeepSpeedEngine):
        export_model(engine.module, tok, job.model_uri, state_dict=weights)
    else:
        export_model(engine.model, tok, job.model_uri, dtype=torch.bfloat16)
    out["export_s"] = time.perf_counter() - started
    Path(job.out_uri, "bench.json").write_text(json.dumps(out))  # Ray Train v2 keeps only checkpointed metrics


def raw_loop(model_cfg: dict, vocab: int, data_uri: str, seq: int, micro: int, steps: int) -> float:
    """A bare torch loop, same model, batch, precision and optimizer: tokens/s."""
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
    skip = int(steps * WARMUP)
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


def pretrain_job(work: Path, parts: dict, size: dict, name: str, zero: int):
    from branchout.core.spec import PretrainSpec
    from branchout.stages.job import TrainJob

    gpu = 1 if _has_gpu() else 0
    t = PretrainSpec(dataset={"path": "unused"}, seq_len=size["seq"], steps=size["steps"],
                     global_batch_size=size["micro"], micro_batch_size=size["micro"], num_workers=1,
                     resources_per_worker={"cpu": 2, "gpu": gpu}, schedule={"warmup_steps": 5},
                     checkpoint_every=10**6, log_every=10**6, deepspeed={"zero_stage": zero, "precision": "bf16"})
    return TrainJob(name=name, kind="pretrain", training=t, steps=size["steps"],
                    model_type="llama", model_overrides=size["model"], tokenizer_uri=parts["tokenizer"],
                    data_uri=parts["general"], out_uri=str(work / name), logs_uri=str(work / "logs"), run_id="bench")


def run_training(job, engine: str) -> dict:

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from branchout.orchestrator.run.ray_train import process_group_backend

    gpu = _has_gpu()
    trainer = TorchTrainer(train_loop, train_loop_config={"job": job, "engine": engine},
                           torch_config=TorchConfig(backend=process_group_backend(gpu)),
                           scaling_config=ScalingConfig(num_workers=1, use_gpu=gpu, resources_per_worker={"CPU": 2}),
                           run_config=RunConfig(name=job.name, storage_path=str(Path(job.out_uri).parent / "ray")))
    trainer.fit()
    return json.loads(Path(job.out_uri, "bench.json").read_text())


def lora_jobs(work: Path, parts: dict, size: dict, base_uri: str, n: int) -> list:
    from branchout.core.spec import FinetuneOptions
    from branchout.stages.job import TrainJob

    o = FinetuneOptions(method="lora", steps=size["lora_steps"], seq_len=size["seq"], global_batch_size=size["micro"],
                        micro_batch_size=size["micro"], schedule={"warmup_steps": 1}, checkpoint_every=10**6,
                        resources_per_worker={"cpu": 2, "gpu": 0.25 if _has_gpu() else 0},
                        deepspeed={"zero_stage": 0, "precision": "bf16"}, lora={"rank": 16, "alpha": 32})
    return [TrainJob(name=f"finetune/lora{i}", kind="finetune", training=o, steps=o.steps,
                     model_type="llama", model_overrides=size["model"], tokenizer_uri=parts["tokenizer"],
                     data_uri=parts["legal"], out_uri=str(work / f"lora{i}"), logs_uri=str(work / "logs"),
                     run_id="bench", method="lora", base_model_uri=base_uri)
            for i in range(n)]


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


T0 = time.time()


def note(what: str) -> None:
    print(f"[{time.time() - T0:6.1f} s] {what}", flush=True)


class Rows(list):
    """The table so far; each row is printed as it is measured, so a later failure keeps it."""

    def append(self, row: tuple[str, str, str, str]) -> None:
        super().append(row)
        name, ratio, raw, target = row
        print(f"{name}: {ratio}   ({raw})   target {target}", flush=True)


def measure(size: dict) -> list[tuple[str, str, str, str]]:
    import ray
    from transformers import AutoModelForCausalLM

    from branchout.orchestrator.run.fanout import submit_task
    from branchout.orchestrator.run.pool import PoolSet
    from branchout.stages.evaluation.evaluate import evaluate_domain, perplexity
    from branchout.stages.prepare.data import open_blocks
    from branchout.stages.training.model import build_config, parameter_counts

    work = Path(tempfile.mkdtemp(prefix="branchout-gpu-"))
    parts = prepare_parts(work, size)
    note("corpus, tokenizer and packed data ready")
    gpu = _has_gpu()
    ray.init(address="local", include_dashboard=False, log_to_driver=False, namespace="bench-gpu")
    params, non_emb = parameter_counts(build_config("llama", size["model"], size["vocab"]))
    m = size["model"]
    flops = 6 * non_emb + 12 * m["num_hidden_layers"] * m["hidden_size"] * size["seq"]
    peak = matmul_peak()
    note(f"bf16 matmul peak {peak / 1e12:.0f} TFLOP/s")
    rows = Rows()
    raw = raw_loop(m, size["vocab"], parts["general"], size["seq"], size["micro"], size["steps"])
    note(f"raw torch loop {raw:,.0f} tok/s")
    engines = (("torch", "torch", 0), ("zero2", "deepspeed", 2), ("zero3", "deepspeed", 3))
    if "--after-pretrain" in sys.argv:  # rows 2-4 only: the ZeRO-3 run is their base model
        engines = engines[2:]
    runs = {label: run_training(pretrain_job(work, parts, size, label, zero), engine) for label, engine, zero in engines}
    for label, r in runs.items():
        rows.append((f"1. pretrain {label} vs raw torch loop (tokens/s, bf16)", f"{r['tokens_per_s'] / raw:.3f}",
                     f"{r['tokens_per_s']:,.0f} vs {raw:,.0f} tok/s; MFU {r['tokens_per_s'] * flops / peak:.1%} vs "
                     f"{raw * flops / peak:.1%} of {peak / 1e12:.0f} TFLOP/s measured bf16 matmul; peak "
                     f"{r['peak_gib']:.1f} GiB; {params / 1e6:.0f}M params, micro-batch {size['micro']} × "
                     f"{size['seq']}", "report"))
    base = str(work / "zero3" / "model")

    note("pretrain runs done")
    jobs = lora_jobs(work, parts, size, base, 5)
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
    rows.append(("2. 4 LoRA fine-tunes packed on one GPU (gpu: 0.25) vs one alone", f"{makespan / single:.2f}×",
                 f"makespan {makespan:.1f} s vs {single:.1f} s alone; {together} ran at once", "< 4×"))

    candidates = {"base": (base, None), "finetuned": (jobs[0].model_uri, base)}
    eval_bundle = {"CPU": 2.0, "GPU": 1.0} if gpu else {"CPU": 1.0}
    r = submit_task(evaluate_domain, ("legal", parts["legal"], candidates, 8, 256, 2, "bf16", gpu), eval_bundle,
                    "evaluate/legal", None).result()
    rows.append(("3. evaluation on the GPU (base + LoRA, bf16)", f"{2 * r['heldout_tokens'] / (r['ended'] - r['started']):,.0f} tok/s",
                 f"{r['ended'] - r['started']:.1f} s for 2 × {r['heldout_tokens']:,} tokens; ppl base "
                 f"{r['base_ppl']:.1f}, LoRA {r['finetuned_ppl']:.1f}", "report"))

    size_bytes = sum(f.stat().st_size for f in Path(base).glob("*.safetensors"))
    reloaded = AutoModelForCausalLM.from_pretrained(base).to("cuda" if gpu else "cpu")  # the dtype it was saved in
    dtype = str(reloaded.dtype)
    ppl, _ = perplexity(reloaded, open_blocks(parts["legal"], "heldout"), 8, 64)
    rows.append(("4. ZeRO-3 export: bf16 sharded safetensors, reloaded", f"{size_bytes / (4 * params):.2f} of fp32",
                 f"{size_bytes / 2**30:.2f} GiB, {len(list(Path(base).glob('*.safetensors')))} file(s), "
                 f"export {runs['zero3']['export_s']:.1f} s; reloaded as {dtype}; held-out ppl {ppl:.1f}", "0.5"))
    ray.shutdown()
    return rows


def main() -> int:
    import torch

    smoke = "--smoke" in sys.argv
    if not torch.cuda.is_available() and not smoke:
        print("no GPU on this machine: the GPU rows were not measured (run this on a GPU machine)")
        write_section(SECTION, [f"Not measured: `python benchmarks/gpu.py` last ran on {time.strftime('%Y-%m-%d')} "
                                  "on a machine without a GPU. No GPU row has been measured yet."])
        return 0
    started = time.time()
    rows = measure(SMOKE if smoke else FULL)
    if smoke:
        print("--smoke: the script ran end to end on the CPU; nothing was written")
        return 0
    device = torch.cuda.get_device_name()
    body = [f"`python benchmarks/gpu.py` on {time.strftime('%Y-%m-%d')}: 1 × {device}, torch {torch.__version__}; "
            f"took {(time.time() - started) / 60:.1f} minutes.", "",
            "| benchmark | ratio | raw numbers | target |", "|---|---|---|---|"]
    body += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    write_section(SECTION, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
