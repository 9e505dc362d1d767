"""The plan: the arithmetic of a pipeline, computed and shown before any compute is spent.

    workers × micro-batch × grad-accum × seq-len = tokens per step

plus steps, total tokens, checkpoints, model size and a rough memory estimate per
worker, for the pretrain and for every domain job. ``branchout validate`` prints it;
``branchout run`` prints it and then follows it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from branchout.orchestrator.spec import PipelineSpec, TrainingSpec

GiB = 1024**3


@dataclass
class TrainingPlan:
    name: str
    workers: int
    micro_batch: int
    grad_accum: int
    seq_len: int
    steps: int
    checkpoint_every: int
    zero_stage: int | None  # None: the plain torch engine (one worker, no offload)
    precision: str
    resources: dict[str, float]
    memory_gib: float

    @property
    def tokens_per_step(self) -> int:
        return self.workers * self.micro_batch * self.grad_accum * self.seq_len

    @property
    def total_tokens(self) -> int:
        return self.tokens_per_step * self.steps

    @property
    def checkpoints(self) -> int:
        return math.ceil(self.steps / self.checkpoint_every)

    def arithmetic(self) -> str:
        return (f"{self.workers} workers × micro-batch {self.micro_batch} × grad-accum "
                f"{self.grad_accum} × {self.seq_len} tokens = {self.tokens_per_step:,} tokens/step")


@dataclass
class Plan:
    pipeline: str
    model_type: str
    params: int
    non_embedding_params: int
    vocab_size: int
    layers: int
    hidden: int
    pretrain: TrainingPlan
    domains: dict[str, TrainingPlan] = field(default_factory=dict)
    domain_methods: dict[str, str] = field(default_factory=dict)
    eval_models: list[str] = field(default_factory=list)
    cluster: str = "embedded local Ray"

    @property
    def fanout_jobs(self) -> int:
        per_domain = 1 + ("scratch" in self.eval_models)
        return per_domain * len(self.domains)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6·N + 12·L·H·T (PaLM appendix B)."""
        return 6 * self.non_embedding_params + 12 * self.layers * self.hidden * seq_len


@dataclass
class ModelShape:
    """What the arithmetic needs to know about the model."""

    params: int
    non_embedding: int
    largest_layer: int  # parameters of the biggest single module (ZeRO-3 gathers one at a time)
    layers: int
    hidden: int
    vocab: int


def model_shape(spec: PipelineSpec) -> ModelShape:
    from branchout.orchestrator.checks import tokenizer_vocab_size
    from branchout.stages.model import MAX_META_LAYERS, build_config, meta_model, parameter_counts

    vocab = tokenizer_vocab_size(spec)
    assert isinstance(vocab, int), "the plan needs a cross-checked spec"
    config = build_config(spec.model.type, spec.model.config, vocab)
    params, non_emb = parameter_counts(config)
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    shallow = meta_model(config, min(layers, MAX_META_LAYERS) if layers > 0 else None)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in shallow.modules())
    return ModelShape(params, non_emb, largest, layers, int(getattr(config, "hidden_size", 0) or 0), vocab)


def _gpu_memory(t: TrainingSpec, override_gb: float | None = None) -> float | None:
    from branchout.cluster.memory import GPUS

    r = t.resources_per_worker
    return override_gb or r.gpu_memory_gb or GPUS.get(r.accelerator or "")


def memory_options(shape: ModelShape, t: TrainingSpec, seq_len: int, gpu_memory_gb: float,
                   trainable: int | None = None):
    """Every ZeRO option for this job on GPUs of ``gpu_memory_gb``, cheapest first."""
    from branchout.cluster.memory import plan_memory

    return plan_memory(trainable or shape.params, shape.largest_layer, t.num_workers,
                       _gpus_per_node(t), seq_len, t.micro_batch_size, shape.hidden, shape.layers,
                       shape.vocab, gpu_memory_gb, t.deepspeed.precision != "fp32")


def _gpus_per_node(t: TrainingSpec) -> int:
    return 8 if t.resources_per_worker.uses_gpu else t.num_workers


def resolve_auto_zero(spec: PipelineSpec) -> tuple[list[str], list[str]]:
    """Replace ``deepspeed.zero_stage: auto`` by the planner's pick, in place.

    Returns:
        (problems, notes): a problem when the GPU is unknown or nothing fits; a note per pick.
    """
    from branchout.cluster.memory import GB, pick

    jobs = [("pretrain", spec.pretrain, spec.pretrain.seq_len)]
    jobs += [(f"finetune.domains.{i}", d, spec.domain_seq_len(d)) for i, d in enumerate(spec.finetune.domains)]
    pending = [(w, t, s) for w, t, s in jobs if t.deepspeed.zero_stage == "auto"]
    if not pending:
        return [], []
    shape = model_shape(spec)
    problems, notes = [], []
    for where, t, seq_len in pending:
        ds = t.deepspeed
        if ds.offload_optimizer or ds.offload_params:
            problems.append(f"{where}.deepspeed: zero_stage 'auto' chooses offload itself; remove offload_*")
            continue
        if t.num_workers == 1 and where != "pretrain":
            ds.zero_stage = 0  # a single-worker fine-tune runs without DeepSpeed
            continue
        memory = _gpu_memory(t)
        if memory is None:
            problems.append(f"{where}.deepspeed.zero_stage: 'auto' needs resources_per_worker.accelerator "
                            "(e.g. H100-80GB) or resources_per_worker.gpu_memory_gb")
            continue
        options = memory_options(shape, t, seq_len, memory)
        best = pick(options)
        if best is None:
            last = options[-1]
            problems.append(f"{where}.deepspeed.zero_stage: nothing fits {memory:g} GB GPUs; even "
                            f"{last.option.label} needs {last.total / GB:.1f} of {last.budget / GB:.1f} GB "
                            "(lower micro_batch_size or seq_len, or use bigger GPUs)")
            continue
        ds.zero_stage = best.option.stage
        ds.offload_optimizer, ds.offload_params = best.option.offload_optimizer, best.option.offload_params
        notes.append(f"{where}.deepspeed.zero_stage: auto → {best.option.label} "
                     f"({best.total / GB:.1f} of {best.budget / GB:.1f} GB usable per GPU)")
    return problems, notes


def build_plan(spec: PipelineSpec) -> Plan:
    """Compute the plan of a validated spec (no Ray, no data access)."""
    shape = model_shape(spec)
    p = spec.pretrain
    pre_steps = p.steps or math.ceil(p.tokens / (p.global_batch_size * p.seq_len))
    plan = Plan(
        pipeline=spec.name, model_type=spec.model.type, params=shape.params,
        non_embedding_params=shape.non_embedding, vocab_size=shape.vocab, layers=shape.layers,
        hidden=shape.hidden, pretrain=_training_plan("pretrain", p, p.seq_len, pre_steps, shape),
        eval_models=list(spec.evaluate.models), cluster=spec.cluster.address or "embedded local Ray",
    )
    for d in spec.finetune.domains:
        trainable = shape.params if d.method == "full" else max(1, shape.params // 100)
        plan.domains[d.name] = _training_plan(d.name, d, spec.domain_seq_len(d), d.steps, shape, trainable)
        plan.domain_methods[d.name] = d.method
    return plan


def _training_plan(name: str, t: TrainingSpec, seq_len: int, steps: int, shape: ModelShape,
                   trainable: int | None = None) -> TrainingPlan:
    from branchout.cluster.memory import ZeroOption, activation_bytes, model_states

    accum = t.global_batch_size // (t.num_workers * t.micro_batch_size)
    zero = int(t.deepspeed.zero_stage) if t.uses_deepspeed() else None
    option = ZeroOption(zero or 0, t.deepspeed.offload_optimizer, t.deepspeed.offload_params)
    mixed = t.deepspeed.precision != "fp32"
    states = model_states(option, trainable or shape.params, shape.largest_layer, t.num_workers, mixed)
    if trainable and trainable < shape.params:  # LoRA: the frozen base still occupies memory
        states += (2 if mixed else 4) * shape.params
    acts = activation_bytes(seq_len, t.micro_batch_size, shape.hidden, shape.layers, shape.vocab, mixed,
                            t.activation_checkpointing)
    return TrainingPlan(
        name=name, workers=t.num_workers, micro_batch=t.micro_batch_size, grad_accum=accum,
        seq_len=seq_len, steps=steps, checkpoint_every=t.checkpoint_every, zero_stage=zero,
        precision=t.deepspeed.precision, resources=t.resources_per_worker.ray_bundle(),
        memory_gib=(states + acts) / GiB,
    )


def check_packing(spec: PipelineSpec) -> list[str]:
    """Fractional GPUs (``gpu: 0.25``) pack jobs onto one GPU; refuse packings that cannot fit.

    A job's GPU memory: full fine-tune 16 bytes/parameter (fp32 weights, grads, Adam); LoRA
    the frozen base in the training precision plus the adapters' states; plus activations.
    Checked only where the GPU type is known (``accelerator`` or ``gpu_memory_gb``).
    """
    from branchout.cluster.memory import GB, activation_bytes, usable_bytes

    problems = []
    shape = None
    for i, d in enumerate(spec.finetune.domains):
        r = d.resources_per_worker
        memory = _gpu_memory(d)
        if not (0 < r.gpu < 1) or memory is None:
            continue
        shape = shape or model_shape(spec)
        mixed = d.deepspeed.precision != "fp32"
        if d.method == "lora":
            adapters = shape.params // 100
            states = (2 if mixed else 4) * shape.params + 16 * adapters
        else:
            states = 16 * shape.params
        per_job = states + activation_bytes(spec.domain_seq_len(d), d.micro_batch_size, shape.hidden,
                                            shape.layers, shape.vocab, mixed, d.activation_checkpointing)
        per_gpu = int(1 / r.gpu + 1e-9)
        if per_gpu * per_job > usable_bytes(memory):
            problems.append(
                f"finetune.domains.{i}.resources_per_worker.gpu: {r.gpu:g} packs {per_gpu} jobs per GPU, "
                f"{per_gpu} × {per_job / GB:.1f} GB > {usable_bytes(memory) / GB:.1f} GB usable on "
                f"{r.accelerator or f'{memory:g} GB GPUs'}; give each job more of a GPU or less memory "
                "(micro_batch_size, seq_len, method: lora)")
    return problems
