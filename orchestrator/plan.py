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
    zero_stage: int | None  # None: single-worker plain torch engine
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


def build_plan(spec: PipelineSpec) -> Plan:
    """Compute the plan of a validated spec (no Ray, no data access)."""
    from branchout.orchestrator.checks import tokenizer_vocab_size
    from branchout.stages.model import build_config, parameter_counts

    vocab = tokenizer_vocab_size(spec)
    assert isinstance(vocab, int), "build_plan needs a cross-checked spec"
    config = build_config(spec.model.type, spec.model.config, vocab)
    params, non_emb = parameter_counts(config)
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    p = spec.pretrain
    pre_steps = p.steps or math.ceil(p.tokens / (p.global_batch_size * p.seq_len))
    plan = Plan(
        pipeline=spec.name, model_type=spec.model.type, params=params,
        non_embedding_params=non_emb, vocab_size=vocab, layers=layers, hidden=hidden,
        pretrain=_training_plan("pretrain", p, p.seq_len, pre_steps, params, layers, hidden, False),
        eval_models=list(spec.evaluate.models),
        cluster=spec.cluster.address or "embedded local Ray",
    )
    for d in spec.finetune.domains:
        trainable = params if d.method == "full" else max(1, params // 100)
        plan.domains[d.name] = _training_plan(d.name, d, spec.domain_seq_len(d), d.steps, params,
                                              layers, hidden, d.num_workers == 1, trainable)
        plan.domain_methods[d.name] = d.method
    return plan


def _training_plan(name: str, t: TrainingSpec, seq_len: int, steps: int, params: int, layers: int,
                   hidden: int, single: bool, trainable: int | None = None) -> TrainingPlan:
    accum = t.global_batch_size // (t.num_workers * t.micro_batch_size)
    zero = None if single else t.deepspeed.zero_stage
    return TrainingPlan(
        name=name, workers=t.num_workers, micro_batch=t.micro_batch_size, grad_accum=accum,
        seq_len=seq_len, steps=steps, checkpoint_every=t.checkpoint_every, zero_stage=zero,
        precision=t.deepspeed.precision, resources=t.resources_per_worker.ray_bundle(),
        memory_gib=estimate_memory(params, trainable or params, t.num_workers, zero or 0,
                                   t.deepspeed.precision, layers, hidden, seq_len,
                                   t.micro_batch_size) / GiB,
    )


def estimate_memory(params: int, trainable: int, workers: int, zero_stage: int, precision: str,
                    layers: int, hidden: int, seq_len: int, micro_batch: int) -> float:
    """Rough bytes per worker: model states (ZeRO paper, §3) plus activations.

    Mixed precision keeps 2-byte weights and grads and 12 bytes of fp32 optimizer state
    (master weights, Adam m and v) per parameter; fp32 keeps 4 + 4 + 8. ZeRO-1 shards
    the optimizer state, ZeRO-2 also the gradients, ZeRO-3 also the weights.
    Activations use ~34·s·b·h bytes per layer (Korthikanti et al., no recomputation).
    """
    half = precision in ("bf16", "fp16")
    w, g, o = (2, 2, 12) if half else (4, 4, 8)
    shard = max(1, workers)
    weights = params * w / (shard if zero_stage >= 3 else 1)
    grads = trainable * g / (shard if zero_stage >= 2 else 1)
    optim = trainable * o / (shard if zero_stage >= 1 else 1)
    activations = 34 * seq_len * micro_batch * hidden * layers * (1 if half else 2)
    return weights + grads + optim + activations
