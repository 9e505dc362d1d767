"""What ZeRO sends per optimizer step, counted on 2 CPU ranks, against ZeRO's theory.

Multi-GPU step time is predicted, not measured (one GPU is all a test machine has):
``cluster.interconnect`` adds ZeRO's per-step volume over the links to a measured
single-GPU step. This checks the volume side on DeepSpeed itself: every collective of two
real ranks passes through a process group (gloo underneath) that adds up its bytes in the
ZeRO paper's units (an all-reduce 2× its tensor, as a ring moves it; a reduce-scatter its
input; an all-gather its output; a reduce or broadcast 1×), over the steady steps of a
run: 2Ψ for ZeRO-2, 3Ψ for ZeRO-3 once layers are released between their forward and
backward (what DeepSpeed does above 1e9 parameters: ``stage3_max_live_parameters`` and
``stage3_max_reuse_distance``, set to 0 here to stand for such a model), 2Ψ below it.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from gloo import gloo_group

from conftest import job_parts

STEPS = 4  # the first is not counted: DeepSpeed sets up its buffers and hooks on it


@pytest.fixture(scope="module")
def parts(corpus_dir, tmp_path_factory):
    return job_parts(tmp_path_factory.mktemp("comm-volume"), corpus_dir)


class CountingGroup(torch.distributed.ProcessGroup):
    """gloo, with every collective's volume added to ``sent`` (bytes, paper units) by op."""

    sent: dict[str, float] = {}

    def __init__(self, inner, rank: int, size: int):
        super().__init__(rank, size)
        self.inner = inner


def _size(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, list | tuple):
        return sum(_size(y) for y in x)
    return 0


# op -> (which argument holds the tensors counted, how many times)
_COUNTED = {
    "allreduce": (0, 2), "allreduce_coalesced": (0, 2), "reduce": (0, 1), "broadcast": (0, 1),
    "allgather": (0, 1), "_allgather_base": (0, 1), "allgather_coalesced": (0, 1),
    "allgather_into_tensor_coalesced": (0, 1), "all_gather_single": (0, 1),
    "reduce_scatter": (1, 1), "_reduce_scatter_base": (1, 1), "reduce_scatter_tensor_coalesced": (1, 1),
    "reduce_scatter_single": (1, 1), "barrier": (0, 0), "monitored_barrier": (0, 0),
}


def _counted(name: str):
    def collective(self, *args, **kwargs):
        where, times = _COUNTED.get(name, (0, 1))
        CountingGroup.sent[name] = CountingGroup.sent.get(name, 0) + times * _size(args[where] if args else [])
        return getattr(self.inner, name)(*args, **kwargs)

    return collective


for _name in (*_COUNTED, "gather", "scatter", "alltoall", "alltoall_base", "send", "recv", "recv_anysource"):
    setattr(CountingGroup, _name, _counted(_name))


def _create_group(store, rank, size, timeout):
    return CountingGroup(gloo_group(store, rank, size, timeout), rank, size)


def _rank_main(rank: int, world: int, port: int, root: str, data_uri: str, overrides: dict, zero: int,
               reuse: int | None) -> None:
    """One rank: train STEPS steps in fp32; the volume of steps 2..STEPS to JSON."""
    import torch.distributed as dist

    from branchout.core.spec import PretrainSpec
    from branchout.stages.job import TrainJob
    from branchout.stages.prepare.data import open_blocks
    from branchout.stages.prepare.tokenizer import load_tokenizer
    from branchout.stages.training.engine import DeepSpeedEngine
    from branchout.stages.training.loop import run_steps
    from branchout.stages.training.model import prepare_model, zero3_config

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.Backend.register_backend("counting", _create_group, devices=["cpu"])
    dist.init_process_group("counting", rank=rank, world_size=world)
    torch.set_num_threads(1)
    config = {} if reuse is None else {"zero_optimization": {"stage3_max_reuse_distance": reuse,
                                                              "stage3_max_live_parameters": reuse}}
    # one micro-batch per rank per step: ZeRO-2 reduces gradients once per micro-batch
    t = PretrainSpec(dataset={"path": "unused"}, steps=STEPS, seq_len=32, global_batch_size=2 * world,
                     micro_batch_size=2, num_workers=world, schedule={"warmup_steps": 1}, log_every=10**6,
                     checkpoint_every=10**6, deepspeed={"zero_stage": zero, "precision": "fp32", "config": config})
    job = TrainJob(name="pretrain", kind="pretrain", training=t, steps=STEPS, model_type="llama",
                   model_overrides=overrides, tokenizer_uri=f"{root}/tokenizer", data_uri=data_uri,
                   out_uri=f"{root}/zero{zero}", logs_uri=f"{root}/logs", run_id="test")
    tok = load_tokenizer(f"{root}/tokenizer")
    model = prepare_model(job, tok, zero3_config=zero3_config(job, tok, world, False))
    params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    engine = DeepSpeedEngine(model, t, STEPS, world, use_gpu=False)
    marks: list[dict[str, float]] = []
    run_steps(engine, open_blocks(data_uri, "train"), t, STEPS, 0, rank, world, None, lambda step, loss: None,
              after_step=lambda step: marks.append(dict(CountingGroup.sent)))
    ops = {op: (marks[-1][op] - marks[0].get(op, 0)) / (STEPS - 1) / (4 * params) for op in marks[-1]}
    from deepspeed.comm import comm

    with open(f"{root}/volume-zero{zero}-{reuse}-rank{rank}.json", "w") as f:
        json.dump({"per_step": sum(ops.values()) * 4 * params, "params": params,
                   # training never calls DeepSpeed's CPU shared-memory all-reduce: not built (engine.py)
                   "shm_op_built": comm.cdb.shm_comm_op is not None,
                   "psi_by_op": {op: round(v, 3) for op, v in ops.items() if v}}, f)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # results are on disk; skip tearing down the Python ProcessGroup subclass


@pytest.mark.parametrize(("zero", "reuse", "psi"), [
    (2, None, 2),  # gradients reduce-scattered, updated weights all-gathered
    (3, 0, 3),  # released after its forward (as above 1e9 parameters), gathered again for the backward
    (3, None, 2),  # below DeepSpeed's live/reuse limits a layer stays gathered from forward to backward
])
def test_zero_sends_what_its_theory_says_per_step(parts, zero, reuse, psi):
    import torch.multiprocessing as mp
    from raycluster import free_port

    from branchout.cluster.interconnect import REUSE_DISTANCE, step_volume

    root, data_uri, overrides = parts
    mp.start_processes(_rank_main, args=(2, free_port(), str(root), data_uri, overrides, zero, reuse), nprocs=2,
                       start_method="spawn")
    ranks = [json.loads((root / f"volume-zero{zero}-{reuse}-rank{r}.json").read_text()) for r in range(2)]
    params = ranks[0]["params"]
    theory = step_volume(zero, params, 4, REUSE_DISTANCE if reuse is None else reuse)
    assert theory == psi * params * 4
    for r in ranks:
        assert r["shm_op_built"] is False
        assert r["per_step"] == pytest.approx(theory, rel=0.10), r["psi_by_op"]
