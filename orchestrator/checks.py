"""Cross-field checks of a schema-valid spec: everything pydantic cannot see field by field.

Each check returns problem lines (``field.path: message``); ``cross_check`` gathers them
all so a file is fixed in one pass. Nothing here starts Ray or reads datasets (that is
``orchestrator.preflight``).
"""

from __future__ import annotations

import os

from branchout.orchestrator.spec import PipelineSpec, TrainingSpec


def cross_check(spec: PipelineSpec) -> list[str]:
    problems: list[str] = []
    problems += _check_training("pretrain", spec.pretrain, spec.pretrain.steps)
    if not spec.finetune.domains:
        problems.append("finetune.domains: name at least one domain to fine-tune")
    for i, domain in enumerate(spec.finetune.domains):
        problems += _check_training(f"finetune.domains.{i}", domain, domain.steps)
    problems += _check_model(spec)
    problems += _check_embedded_capacity(spec)
    return problems


def _check_training(where: str, t: TrainingSpec, steps: int | None) -> list[str]:
    problems = []
    per_step = t.num_workers * t.micro_batch_size
    if t.global_batch_size % per_step:
        problems.append(
            f"{where}.global_batch_size: {t.global_batch_size} is not divisible by "
            f"num_workers × micro_batch_size = {t.num_workers} × {t.micro_batch_size} = {per_step}"
        )
    ds = t.deepspeed
    if ds.zero_stage == "auto":
        pass  # the planner picks stage and offload (orchestrator.plan.resolve_auto_zero)
    elif ds.offload_params and ds.zero_stage != 3:
        problems.append(f"{where}.deepspeed.offload_params: needs zero_stage 3 (got {ds.zero_stage})")
    elif ds.offload_optimizer and ds.zero_stage == 0:
        problems.append(f"{where}.deepspeed.offload_optimizer: needs zero_stage 1, 2 or 3 (got 0)")
    r = t.resources_per_worker
    if r.accelerator and r.gpu_memory_gb is None:
        from branchout.cluster.memory import GPUS

        if r.accelerator not in GPUS:
            problems.append(f"{where}.resources_per_worker.accelerator: unknown GPU {r.accelerator!r}; "
                            f"known: {', '.join(GPUS)} (or set gpu_memory_gb)")
    if ds.precision == "fp16" and not t.resources_per_worker.uses_gpu:
        problems.append(
            f"{where}.deepspeed.precision: fp16 needs a GPU (resources_per_worker.gpu > 0); "
            "use bf16 or fp32 on the CPU"
        )
    if steps is not None and t.schedule.warmup_steps >= steps:
        problems.append(
            f"{where}.schedule.warmup_steps: {t.schedule.warmup_steps} must be below steps ({steps})"
        )
    return problems


def _check_model(spec: PipelineSpec) -> list[str]:
    from branchout.stages.model import (
        MAX_META_LAYERS,
        ModelConfigError,
        build_config,
        default_lora_targets,
        max_positions,
        meta_model,
        missing_lora_targets,
        parameter_counts,
    )

    vocab = tokenizer_vocab_size(spec)
    if isinstance(vocab, str):
        return [vocab]
    try:
        config = build_config(spec.model.type, spec.model.config, vocab)
    except ModelConfigError as e:
        return [f"model: {e}"]
    except (TypeError, ValueError, AttributeError, OverflowError) as e:  # the config class rejected a value
        return [f"model.config: {_one_line(e)}"]
    problems = []
    limit = max_positions(config)
    if limit is not None:
        if spec.pretrain.seq_len > limit:
            problems.append(f"pretrain.seq_len: {spec.pretrain.seq_len} exceeds the model's {limit} positions")
        for i, d in enumerate(spec.finetune.domains):
            if spec.domain_seq_len(d) > limit:
                problems.append(
                    f"finetune.domains.{i}.seq_len: {spec.domain_seq_len(d)} exceeds the model's {limit} positions"
                )
    try:
        layers = getattr(config, "num_hidden_layers", None)
        model = meta_model(config, min(layers, MAX_META_LAYERS) if isinstance(layers, int) and layers > 0 else None)
        parameter_counts(config)
    except Exception as e:  # transformers raises many types for inconsistent configs
        return problems + [f"model.config: cannot build {spec.model.type}: {_one_line(e)}"]
    lora_domains = [(i, d) for i, d in enumerate(spec.finetune.domains) if d.method == "lora"]
    if lora_domains:
        for i, d in lora_domains:
            targets = d.lora.target_modules or default_lora_targets(spec.model.type)
            if not targets:
                problems.append(
                    f"finetune.domains.{i}.lora.target_modules: peft has no default for "
                    f"{spec.model.type!r}; name the modules to adapt"
                )
                continue
            missing = missing_lora_targets(model, targets)
            if missing:
                problems.append(
                    f"finetune.domains.{i}.lora.target_modules: {', '.join(missing)} not found in "
                    f"{spec.model.type} (e.g. {_example_linear_names(model)})"
                )
    return problems


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


def tokenizer_vocab_size(spec: PipelineSpec) -> int | str:
    """The vocabulary the model will have, or a problem line."""
    if spec.tokenizer.path is None:
        return spec.tokenizer.vocab_size
    from branchout.stages.tokenizer import TokenizerError, load_tokenizer

    try:
        return len(load_tokenizer(spec.tokenizer.path))
    except TokenizerError as e:
        return f"tokenizer.path: {e}"


def _example_linear_names(model) -> str:
    import torch

    leaf = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    return ", ".join(leaf[:6])


def _check_embedded_capacity(spec: PipelineSpec) -> list[str]:
    """An embedded Ray holds only this machine; a request beyond it would wait forever."""
    if spec.cluster.address is not None or spec.cluster.autoscaling or os.environ.get("RAY_ADDRESS"):
        return []  # a cluster's capacity is checked once connected (orchestrator.driver)
    cpus = spec.cluster.num_cpus or os.cpu_count() or 1
    gpus = spec.cluster.num_gpus if spec.cluster.num_gpus is not None else _local_gpus()
    problems = []
    jobs = [("pretrain", spec.pretrain)] + [
        (f"finetune.domains.{i}", d) for i, d in enumerate(spec.finetune.domains)
    ]
    for where, t in jobs:
        r = t.resources_per_worker
        if t.num_workers * r.cpu > cpus:
            problems.append(
                f"{where}.num_workers: {t.num_workers} workers × {r.cpu:g} CPU exceed the "
                f"embedded Ray's {cpus} CPUs (set cluster.address to use a cluster)"
            )
        if t.num_workers * r.gpu > gpus:
            problems.append(
                f"{where}.resources_per_worker.gpu: {t.num_workers} × {r.gpu:g} GPU requested, "
                f"this machine has {gpus}"
            )
    return problems


def _local_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # a broken CUDA install counts as no GPU here, not as a crash
        return 0
