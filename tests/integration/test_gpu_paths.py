"""The distributed code as it runs under NCCL, shown on 2 CPU ranks with DeepSpeed on gloo.

NCCL takes only CUDA tensors; a collective on a host tensor fails at once ("No backend
type associated with device type cpu"). These ranks run on a process group that behaves
the same way for whatever is not the engine's device: it is gloo underneath, and it
records every collective (construction under ``zero.Init``, training, the loss reads, the
export) with the devices of its tensors, refusing any other device as NCCL refuses the CPU.
On the CPU the engine's device *is* the CPU, so this shows the invariant and the loss's
read schedule; the GPU run itself is ``benchmarks/gpu.py``.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from gloo import gloo_group

from conftest import job_parts

STEPS = 6
ENGINE_DEVICE = "cpu"  # what the recording group accepts, as NCCL accepts only "cuda"


@pytest.fixture(scope="module")
def parts(corpus_dir, tmp_path_factory):
    return job_parts(tmp_path_factory.mktemp("gpu-paths"), corpus_dir)


class DeviceCheckedGroup(torch.distributed.ProcessGroup):
    """A process group on gloo that records every collective and refuses tensors that are
    not on ``ENGINE_DEVICE``, with NCCL's message."""

    seen: list[tuple[str, list[str], list[tuple]]] = []

    def __init__(self, inner, rank: int, size: int):
        super().__init__(rank, size)
        self.inner = inner


def _tensors(x) -> list:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, list | tuple):
        return [t for y in x for t in _tensors(y)]
    return []


def _checked(name: str):
    def collective(self, *args, **kwargs):
        tensors = _tensors(list(args) + list(kwargs.values()))
        DeviceCheckedGroup.seen.append((name, [t.device.type for t in tensors], [tuple(t.shape) for t in tensors]))
        wrong = [t.device.type for t in tensors if t.device.type != ENGINE_DEVICE]
        if wrong:
            raise RuntimeError(f"No backend type associated with device type {wrong[0]}")
        return getattr(self.inner, name)(*args, **kwargs)

    return collective


for _name in ("allreduce", "allreduce_coalesced", "broadcast", "allgather", "_allgather_base", "allgather_coalesced",
              "allgather_into_tensor_coalesced", "all_gather_single", "all_gather_single_coalesced", "reduce_scatter",
              "_reduce_scatter_base", "reduce_scatter_single", "reduce_scatter_single_coalesced",
              "reduce_scatter_tensor_coalesced", "barrier", "monitored_barrier", "gather", "scatter", "reduce",
              "alltoall", "alltoall_base", "all_to_all_single", "send", "recv", "recv_anysource"):
    setattr(DeviceCheckedGroup, _name, _checked(_name))


def _create_group(store, rank, size, timeout):
    return DeviceCheckedGroup(gloo_group(store, rank, size, timeout), rank, size)


def _rank_main(rank: int, world: int, port: int, root: str, data_uri: str, overrides: dict, zero: int) -> None:
    """One rank: build (ZeRO-3: partitioned), train, read the loss, export; results to JSON."""
    import torch.distributed as dist
    from safetensors.torch import load_file

    from branchout.core.spec import PretrainSpec
    from branchout.stages.job import TrainJob
    from branchout.stages.prepare.data import open_blocks
    from branchout.stages.prepare.tokenizer import load_tokenizer
    from branchout.stages.training.engine import DeepSpeedEngine, decide_precision
    from branchout.stages.training.loop import run_steps
    from branchout.stages.training.model import export_model, prepare_model, zero3_config
    from branchout.stages.training.recipe import Checkpoints, heldout_scorer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.Backend.register_backend("checked", _create_group, devices=["cpu"])
    dist.init_process_group("checked", rank=rank, world_size=world)
    torch.set_num_threads(1)
    t = PretrainSpec(dataset={"path": "unused"}, steps=STEPS, seq_len=32, global_batch_size=4, micro_batch_size=2,
                     num_workers=world, optimizer={"lr": 3e-3}, schedule={"warmup_steps": 2}, log_every=4,
                     checkpoint_every=2, eval_every=3, eval_blocks=8,
                     deepspeed={"zero_stage": zero})  # precision: auto
    job = TrainJob(name="pretrain", kind="pretrain", training=t, steps=STEPS,
                   model_type="llama", model_overrides=overrides, tokenizer_uri=f"{root}/tokenizer",
                   data_uri=data_uri, out_uri=f"{root}/zero{zero}", logs_uri=f"{root}/logs", run_id="test")
    # as train_worker does: the ranks agree on one precision (a collective, checked like the rest)
    job, precision = decide_precision(job, False, world)
    t = job.spec()
    tok = load_tokenizer(f"{root}/tokenizer")
    model = prepare_model(job, tok, zero3_config=zero3_config(job, tok, world, False))
    held = sum(getattr(p, "ds_tensor", p).numel() for p in model.parameters())  # this rank's own elements
    engine = DeepSpeedEngine(model, t, STEPS, world, use_gpu=False)
    marks: list[int] = []
    # the recipe's checkpoints, as a worker group writes them (saves, the ranks' verdicts, retention)
    sink = Checkpoints(job, rank, world, engine.device, final=True)
    scored: list[dict] = []

    class Logger:  # what the loop logs: the held-out scores (eval_every) among it
        def log(self, step, **values):
            if "eval_loss" in values:
                scored.append({"step": step, "eval_loss": values["eval_loss"]})

    result = run_steps(engine, open_blocks(data_uri, "train"), t, STEPS, 0, rank, world, Logger(),
                       lambda step, loss: sink.save(engine, step, loss),
                       after_step=lambda step: marks.append(len(DeviceCheckedGroup.seen)),
                       scorer=heldout_scorer(job, t, rank, world))
    weights = engine.state_dict_for_export()  # collective under ZeRO-3
    if rank == 0:
        export_model(engine.module, tok, job.model_uri, state_dict=weights)
    dist.barrier()
    import deepspeed

    params = dict(engine.module.named_parameters())
    exported: dict = {}
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=zero == 3):
        if rank == 0:
            files = [f for f in os.listdir(job.model_uri) if f.endswith(".safetensors")]
            for f in files:
                exported.update(load_file(os.path.join(job.model_uri, f)))
            same = {n: bool(n in exported and torch.equal(exported[n], p.detach().cpu())) for n, p in params.items()}
        full = sum(p.numel() for p in params.values())
    out = {"rank": rank, "device": str(engine.device), "held": held, "full": full, "loss": result.final_loss,
           "scored": scored,
           "seen": DeviceCheckedGroup.seen, "marks": marks, "precision": precision.used,
           "checkpoints": {n: sorted(f for f in os.listdir(os.path.join(job.checkpoints_uri, n)) if f.startswith("MANIFEST"))
                           for n in sorted(os.listdir(job.checkpoints_uri))}}
    if rank == 0:
        out.update(same=same, dtypes=sorted({str(v.dtype) for v in exported.values()}), files=sorted(files))
    with open(f"{root}/zero{zero}-rank{rank}.json", "w") as f:
        json.dump(out, f)
    dist.barrier()  # no rank tears its connections down while a peer still talks on them
    dist.destroy_process_group()
    # The results are on disk. Skip the interpreter's teardown: it destroys the Python
    # subclass of ProcessGroup above and DeepSpeed's state in an order of its own, and an
    # abort there (seen once on CI, SIGABRT) would say nothing about the code under test.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _run_ranks(parts, zero: int) -> list[dict]:
    import torch.multiprocessing as mp
    from raycluster import free_port

    root, data_uri, overrides = parts
    try:
        mp.start_processes(_rank_main, args=(2, free_port(), str(root), data_uri, overrides, zero), nprocs=2,
                           start_method="spawn")
    except mp.ProcessExitedException as e:
        written = [r for r in range(2) if (root / f"zero{zero}-rank{r}.json").exists()]
        raise AssertionError(f"{e} (ranks that had written their results: {written or 'none'})") from e
    return [json.loads((root / f"zero{zero}-rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("zero", [2, 3])
def test_collectives_stay_on_the_engine_device_and_the_export_is_the_trained_model(parts, zero):
    """In the precision ``auto`` picks on this CPU: bf16 (16-bit export, half of fp32) where
    it is native, fp32 where bf16 would be emulated (and this test many times slower)."""
    from transformers import AutoModelForCausalLM

    from branchout.core.precision import cpu_hardware, decide

    used = decide("auto", cpu_hardware()).used
    dtype = torch.bfloat16 if used == "bf16" else torch.float32
    ranks = _run_ranks(parts, zero)
    assert [r["precision"] for r in ranks] == [used, used]
    for r in ranks:
        assert r["device"] == ENGINE_DEVICE
        assert r["seen"], "no collective went through the checked group"
        assert all(d == ENGINE_DEVICE for _, devices, _ in r["seen"] for d in devices)
    assert ranks[0]["loss"] == ranks[1]["loss"]  # read once, averaged over the ranks
    # saved at steps 2, 4 and 6 (the last too: DeepSpeed); retention keeps the newest 2, each with both ranks' manifests
    assert ranks[0]["checkpoints"] == {f"step_0000000{s}": ["MANIFEST.rank0.json", "MANIFEST.rank1.json"] for s in (4, 6)}
    # The loop's own reduction ([step loss, window sum], shape (2,)) runs on report steps
    # only: the first step, every log_every (4) steps, the last, the checkpoint steps (every
    # 2: a checkpoint records its loss) and the held-out scorings (every 3, whose own sum
    # [Σ token loss, tokens] is shape (2,) too), never once per step.
    marks = [0] + ranks[0]["marks"]
    reads = [s + 1 for s in range(STEPS) if any(
        op == "allreduce" and shapes == [[2]] for op, _, shapes in ranks[0]["seen"][marks[s]:marks[s + 1]])]
    assert reads == [1, 2, 3, 4, 6]
    # eval_every: scored at steps 3 and 6 on both ranks' slices (every forward a collective under
    # ZeRO-3), one sum over the ranks: both ranks log the same held-out loss
    assert [r["step"] for r in ranks[0]["scored"]] == [3, 6]
    assert ranks[0]["scored"] == ranks[1]["scored"] and all(0 < r["eval_loss"] < 20 for r in ranks[0]["scored"])

    r0 = ranks[0]
    if zero == 3:  # built under zero.Init: each rank only ever held its half (plus padding)
        assert r0["held"] <= r0["full"] // 2 + 64 and ranks[1]["held"] <= r0["full"] // 2 + 64
    else:
        assert r0["held"] == r0["full"]
    assert all(r0["same"].values()), [n for n, ok in r0["same"].items() if not ok]
    assert r0["dtypes"] == [str(dtype)]  # the training dtype
    model_dir = parts[0] / f"zero{zero}" / "model"
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir)
    assert reloaded.dtype == dtype


def test_the_checked_group_refuses_what_nccl_refuses(parts):
    group = DeviceCheckedGroup(None, 0, 1)
    with pytest.raises(RuntimeError, match="No backend type associated with device type meta"):
        group.allreduce([torch.ones(2, device="meta")])
