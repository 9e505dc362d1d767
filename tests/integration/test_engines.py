"""The two engines are one training: the plain torch engine (one worker) and DeepSpeed
(several workers) take the same steps from the same data to the same fp32 weights.

One-worker jobs stopped using DeepSpeed for speed; this keeps that a pure speed choice.
DeepSpeed runs in this process on a one-rank gloo group, exactly as inside Ray Train.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import job_parts


@pytest.fixture(scope="module")
def parts(corpus_dir, tmp_path_factory):
    return job_parts(tmp_path_factory.mktemp("engines"), corpus_dir)


@pytest.fixture(scope="module")
def process_group():
    import os

    import torch.distributed as dist
    from raycluster import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _train(parts, engine_name: str, zero_stage: int, compile: bool = False, fused: bool = False,
           ) -> dict[str, np.ndarray]:
    from branchout.core.spec import PretrainSpec
    from branchout.stages.prepare.data import open_blocks
    from branchout.stages.prepare.tokenizer import load_tokenizer, special_token_ids
    from branchout.stages.training.engine import DeepSpeedEngine, TorchEngine
    from branchout.stages.training.loop import run_steps
    from branchout.stages.training.model import build_config, build_model

    root, data_uri, overrides = parts
    t = PretrainSpec(dataset={"path": "unused"}, steps=6, seq_len=32, global_batch_size=4, micro_batch_size=2,
                     optimizer={"lr": 3e-3, "grad_clip": 0.5, "fused": fused}, schedule={"warmup_steps": 2},
                     deepspeed={"zero_stage": zero_stage, "precision": "fp32"}, checkpoint_every=100,
                     compile=compile)
    tok = load_tokenizer(str(root / "tokenizer"))
    model = build_model(build_config("llama", overrides, len(tok), special_token_ids(tok)), seed=7)
    engine = (TorchEngine(model, t, 6) if engine_name == "torch"
              else DeepSpeedEngine(model, t, 6, world_size=1, use_gpu=False))
    assert (engine.kernels.compile, engine.kernels.fused_optimizer) == (compile, fused)
    if compile and engine_name == "torch":
        from branchout.stages.training.kernels import decoder_layers

        assert all(layer._compiled_call_impl is not None for layer in decoder_layers(engine.model))
    run_steps(engine, open_blocks(data_uri, "train"), t, 6, 0, 0, 1, None, lambda step, loss: None)
    trained = engine.model if engine_name == "torch" else engine.engine.module
    return {k: v.detach().float().numpy().copy() for k, v in trained.state_dict().items()}


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_plain_torch_engine_matches_deepspeed_in_fp32(parts, process_group, zero_stage):
    plain, ds = _train(parts, "torch", zero_stage), _train(parts, "deepspeed", zero_stage)
    assert plain.keys() == ds.keys()
    init = _train_none(parts)
    for name in plain:
        assert np.allclose(plain[name], ds[name], rtol=1e-4, atol=1e-5), name
    moved = [n for n in plain if not np.allclose(plain[n], init[n])]
    assert len(moved) > len(plain) // 2  # both trained; equal because they took the same steps


@pytest.mark.parametrize("engine_name", ["torch", "deepspeed"])
def test_compiled_layers_and_fused_adamw_train_the_same_weights(parts, process_group, engine_name):
    """The GPU switches (``compile``, ``optimizer.fused``) are speed only: the same steps, the
    same weights under the same names (checkpoints and exports do not change), for the plain
    engine (layers compiled in place) and DeepSpeed (its engine.compile)."""
    import torch._dynamo

    eager = _train(parts, engine_name, 2)
    torch._dynamo.reset()
    fast = _train(parts, engine_name, 2, compile=True, fused=True)
    assert fast.keys() == eager.keys()
    for name in eager:
        assert np.allclose(fast[name], eager[name], rtol=1e-3, atol=1e-4), name


def _train_none(parts) -> dict[str, np.ndarray]:
    from branchout.stages.prepare.tokenizer import load_tokenizer, special_token_ids
    from branchout.stages.training.model import build_config, build_model

    root, _, overrides = parts
    tok = load_tokenizer(str(root / "tokenizer"))
    model = build_model(build_config("llama", overrides, len(tok), special_token_ids(tok)), seed=7)
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def test_the_plain_engine_scales_fp16_losses_and_checkpoints_its_scaler(parts, tmp_path):
    """``precision: auto`` picks fp16 on GPUs without bf16 (V100, T4), for one-worker jobs too,
    which train with the plain engine: its loss scaler must run, clip the unscaled
    gradients, and resume with the scale it had. fp16 arithmetic runs on the CPU here (slow
    but tiny); the GPU path is the same code with another device string."""
    import torch

    from branchout.core.spec import PretrainSpec
    from branchout.stages.prepare.data import open_blocks
    from branchout.stages.prepare.tokenizer import load_tokenizer, special_token_ids
    from branchout.stages.training.engine import TorchEngine
    from branchout.stages.training.loop import run_steps
    from branchout.stages.training.model import build_config, build_model

    root, data_uri, overrides = parts
    tok = load_tokenizer(str(root / "tokenizer"))

    def engine(precision: str) -> TorchEngine:
        t = PretrainSpec(dataset={"path": "unused"}, steps=4, seq_len=32, global_batch_size=4, micro_batch_size=2,
                         optimizer={"lr": 3e-3, "grad_clip": 0.5}, schedule={"warmup_steps": 1},
                         deepspeed={"zero_stage": 0, "precision": precision}, checkpoint_every=100)
        model = build_model(build_config("llama", overrides, len(tok), special_token_ids(tok)), seed=7)
        return TorchEngine(model, t, 4), t

    (half, t), (full, _) = engine("fp16"), engine("fp32")
    assert half.scaler.is_enabled() and not full.scaler.is_enabled()
    blocks = open_blocks(data_uri, "train")
    a = run_steps(half, blocks, t, 4, 0, 0, 1, None, lambda step, loss: None)
    b = run_steps(full, blocks, t, 4, 0, 0, 1, None, lambda step, loss: None)
    assert np.isfinite(a.final_loss) and abs(a.final_loss - b.final_loss) < 0.05 * b.final_loss
    moved = [n for n, p in half.model.named_parameters()
             if not torch.equal(p, dict(engine("fp32")[0].model.named_parameters())[n])]
    assert moved  # the scaled steps were taken, not all skipped as overflows
    half.scaler.update(1234.0)  # a scale of its own, which the checkpoint must carry
    half.save(str(tmp_path / "ckpt"), {"step": 4})
    again, _ = engine("fp16")
    assert again.load(str(tmp_path / "ckpt")) == {"step": 4}
    assert again.scaler.get_scale() == 1234.0
