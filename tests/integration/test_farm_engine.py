"""The adapter farm trains each member exactly as a lone LoRA job would.

Four LoRA domains (ranks 4/8/8/16, different learning rates and data orders) trained 200
steps together in one farm, against each trained alone by the lone path (peft on its own
copy of the base, ``TorchEngine``), in fp32 with the same data order: per-step losses
within 1e-5 relative, adapter tensors allclose(rtol=1e-4, atol=1e-6). One member forced to
diverge leaves the other three exactly where a farm without it leaves them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import job_for, job_parts

STEPS = 200
MEMBERS = {"a": dict(rank=4, lr=3e-3, seed=0), "b": dict(rank=8, lr=1e-3, seed=1),
           "c": dict(rank=8, lr=2e-3, seed=2), "d": dict(rank=16, lr=5e-4, seed=3)}


def _job(parts, name: str, rank: int, lr: float, seed: int):
    return job_for(parts, name, "lora", steps=STEPS, seed=seed, optimizer={"lr": lr, "grad_clip": 1.0},
                   lora={"rank": rank, "alpha": 2 * rank}, schedule={"warmup_steps": 10})


@pytest.fixture(scope="module")
def parts(corpus_dir, tmp_path_factory):
    return job_parts(tmp_path_factory.mktemp("farm"), corpus_dir)


@pytest.fixture(scope="module")
def alone(parts):
    """Each member trained by the lone path: (per-step losses, its adapter's state)."""
    import torch

    from branchout.stages.prepare.data import open_blocks
    from branchout.stages.prepare.tokenizer import load_tokenizer
    from branchout.stages.training.batches import BlockOrder, step_micro_batches
    from branchout.stages.training.engine import TorchEngine
    from branchout.stages.training.model import prepare_model

    torch.set_num_threads(1)
    blocks = open_blocks(parts[1], "train")
    tokenizer = load_tokenizer(str(parts[0] / "tokenizer"))
    out = {}
    for name, m in MEMBERS.items():
        job = _job(parts, name, **m)
        t = job.training
        engine = TorchEngine(prepare_model(job, tokenizer), t, STEPS)
        order = BlockOrder(len(blocks), t.seed)
        losses = []
        for step in range(STEPS):  # as stages.training.loop.run_steps reads each step's blocks
            micro = [torch.from_numpy(blocks[np.sort(idx)].astype(np.int64))
                     for idx in step_micro_batches(order, step, t.global_batch_size, t.micro_batch_size, 0, 1)]
            losses.append(float(engine.train_step(micro)))
        state = {k: v.detach().clone() for k, v in engine.model.state_dict().items() if "lora_" in k}
        out[name] = (losses, state)
    return out


def _farm(parts, names, diverge: str | None = None, rows_per_forward: int | None = None):
    import torch
    from transformers import AutoModelForCausalLM

    from branchout.stages.prepare.data import open_blocks
    from branchout.stages.training.farm import Farm, Member
    from branchout.stages.training.model import default_lora_targets

    torch.set_num_threads(1)
    blocks = open_blocks(parts[1], "train")
    base = AutoModelForCausalLM.from_pretrained(str(parts[0] / "base"), dtype=torch.float32)
    farm = Farm(base, default_lora_targets("llama"), rows_per_forward=rows_per_forward)
    for name in names:
        farm.add(Member(name, _job(parts, name, **MEMBERS[name]).training, blocks))
    losses = {name: [] for name in names}
    for step in range(STEPS):
        if diverge and step == 50:
            with torch.no_grad():  # a wild update: this member's loss is no longer finite
                for p in farm.members[diverge].params:
                    p.fill_(float("inf"))
        for name, loss in farm.step().items():
            losses[name].append(loss)
            if not math.isfinite(loss):
                farm.remove(name)
    return farm, losses


@pytest.mark.parametrize("rows_per_forward", [None, 2], ids=["one-forward", "a-member-per-forward"])
def test_four_members_train_as_four_lone_jobs(parts, alone, rows_per_forward):
    import torch

    farm, losses = _farm(parts, list(MEMBERS), rows_per_forward=rows_per_forward)
    for name, (lone_losses, lone_state) in alone.items():
        assert len(losses[name]) == STEPS
        np.testing.assert_allclose(losses[name], lone_losses, rtol=1e-5, err_msg=name)
        mine = farm.adapter_state(name)
        assert sorted(mine) == sorted(lone_state), name  # peft's names: a lone job's checkpoint keys
        for key, tensor in lone_state.items():
            torch.testing.assert_close(mine[key], tensor, rtol=1e-4, atol=1e-6, msg=f"{name} {key}")
        # and it learned: the adapter moved and its loss fell
        assert any(float(t.abs().max()) > 0 for k, t in mine.items() if "lora_B" in k)
        assert np.mean(losses[name][-20:]) < np.mean(losses[name][:20])
    # different ranks, learning rates and data orders: four different results
    assert len({round(v[0][-1], 6) for v in alone.values()}) == 4


def test_a_diverging_member_is_taken_out_and_the_others_do_not_notice(parts, alone):
    import torch

    farm, losses = _farm(parts, list(MEMBERS), diverge="b")
    assert "b" not in farm.members and not math.isfinite(losses["b"][-1]) and len(losses["b"]) == 51
    for name in ("a", "c", "d"):
        np.testing.assert_allclose(losses[name], alone[name][0], rtol=1e-5, err_msg=name)
        for key, tensor in alone[name][1].items():
            torch.testing.assert_close(farm.adapter_state(name)[key], tensor, rtol=1e-4, atol=1e-6)
