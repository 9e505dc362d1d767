"""The plan: the arithmetic of a pipeline, computed and shown before any compute is spent.

    workers × micro-batch × grad-accum × seq-len = tokens per step

plus steps, total tokens, checkpoints, model size and a rough memory estimate per
worker, for the pretrain and for every job after it: each domain's fine-tune, its
from-scratch baseline (when ``evaluate.models`` has ``scratch``) and its evaluation. The
fan-out and evaluation jobs are listed in ``Plan.jobs`` with the resources they ask Ray
for; ``check_packing`` refuses GPU packings that cannot hold them. ``branchout validate``
prints it; ``branchout run`` prints it and then follows it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from branchout.core.graph import JobGraph, Kind, Node, build_graph
from branchout.core.spec import PipelineSpec, TrainingSpec

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
    precision: str  # as its workers will decide it, or "auto" where the plan cannot know
    resources: dict[str, float]
    memory_gib: float
    precision_why: str = ""  # "auto: CPU AMD EPYC has no AVX512-BF16 or AMX: …" (core.precision)
    precision_warning: str | None = None  # an explicit setting the hardware will emulate

    def precision_text(self) -> str:
        """``fp32 (auto: CPU … has no AVX512-BF16 or AMX: bf16 would be emulated, …)``."""
        return f"{self.precision} ({self.precision_why})" if self.precision_why else self.precision

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
class JobPlan:
    """One job after the pretrain: what it runs on and what it needs there."""

    name: str  # finetune/<domain>, scratch/<domain>, evaluate/<domain>
    domain: str
    kind: str  # finetune | scratch | evaluate
    workers: int
    resources: dict[str, float]  # one worker's Ray bundle (GPU share, accelerator type, CPUs)
    engine: str  # how it runs: "torch, LoRA", "ZeRO-2 × 4", "score bf16"
    memory_bytes: float  # per worker: device memory on a GPU, host memory on the CPU
    steps: int = 0
    tokens: int = 0

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GiB


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
    jobs: list[JobPlan] = field(default_factory=list)  # every fan-out and evaluation job
    # jobs of kinds the driver runs from their graph node (core.graph Node.entry), e.g. cross
    others: list[JobPlan] = field(default_factory=list)

    @property
    def fanout_jobs(self) -> int:
        return sum(j.kind != "evaluate" for j in self.jobs)

    def job(self, name: str) -> JobPlan:
        """The planned job called ``name`` (``evaluate/legal``).

        Raises:
            KeyError: no such job in this plan.
        """
        for job in self.jobs:
            if job.name == name:
                return job
        raise KeyError(name)

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
    model_type: str = ""


def model_shape(spec: PipelineSpec) -> ModelShape:
    from branchout.orchestrator.config.checks import spec_config
    from branchout.stages.training.model import MAX_META_LAYERS, meta_model, parameter_counts

    config = spec_config(spec)
    if isinstance(config, str):  # a programming error: callers validate first
        raise ValueError(f"the plan needs a cross-checked spec: {config}")
    vocab = int(config.vocab_size)
    params, non_emb = parameter_counts(config)
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    shallow = meta_model(config, min(layers, MAX_META_LAYERS) if layers > 0 else None)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in shallow.modules())
    return ModelShape(params, non_emb, largest, layers, int(getattr(config, "hidden_size", 0) or 0), vocab,
                      config.model_type)


def _gpu_memory(t: TrainingSpec, override_gb: float | None = None) -> float | None:
    from branchout.cluster.gpu_memory import GPUS

    r = t.resources_per_worker
    return override_gb or r.gpu_memory_gb or GPUS.get(r.accelerator or "")


def memory_options(shape: ModelShape, t: TrainingSpec, seq_len: int, gpu_memory_gb: float,
                   trainable: int | None = None):
    """Every ZeRO option for this job on GPUs of ``gpu_memory_gb``, cheapest first."""
    from branchout.cluster.gpu_memory import plan_memory

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
    from branchout.cluster.gpu_memory import GB, pick

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


def suggest_micro_batches(spec: PipelineSpec) -> list[str]:
    """A note for each GPU job whose micro-batch is smaller than what fits its GPU type.

    Fewer, larger micro-batches are the same optimizer step in fewer, larger kernels; on an
    H200 the 171M pretrain ran 1.7× faster at micro-batch 32 than at 8 (benchmarks/RESULTS.md,
    GPU rows). Only where the GPU type (or its memory) is known; the pick is the planner's
    estimate (``cluster.gpu_memory.largest_micro_batch``), not a measurement.
    """
    from branchout.cluster.gpu_memory import ZeroOption, largest_micro_batch

    jobs = [("pretrain", spec.pretrain, spec.pretrain.seq_len)]
    jobs += [(f"finetune.domains.{i}", d, spec.domain_seq_len(d)) for i, d in enumerate(spec.finetune.domains)]
    jobs = [(w, t, s, _gpu_memory(t)) for w, t, s in jobs if t.resources_per_worker.uses_gpu]
    jobs = [j for j in jobs if j[3] and str(j[1].deepspeed.zero_stage) != "auto"]
    if not jobs:
        return []
    shape = model_shape(spec)
    notes = []
    for where, t, seq_len, memory in jobs:
        ds = t.deepspeed
        option = ZeroOption(int(ds.zero_stage) if t.uses_deepspeed() else 0, ds.offload_optimizer, ds.offload_params)
        per_worker = t.global_batch_size // t.num_workers
        best = largest_micro_batch(option, shape.params, shape.largest_layer, t.num_workers, seq_len, per_worker,
                                   shape.hidden, shape.layers, shape.vocab, memory, t.deepspeed.precision != "fp32")
        if best and best > t.micro_batch_size:
            notes.append(f"{where}.micro_batch_size: {t.micro_batch_size} of {per_worker} blocks per worker per "
                         f"step; {best} fit {memory:g} GB GPUs by the planner's estimate (larger micro-batches "
                         "fill a GPU better)")
    return notes


def build_plan(spec: PipelineSpec, graph: JobGraph | None = None) -> Plan:
    """Compute the plan of a validated spec (no Ray, no data access); ``graph``: its job
    graph, built here when not given."""
    graph = graph or build_graph(spec)
    shape = model_shape(spec)
    p = spec.pretrain
    embedded = spec.cluster.address is None
    pre_steps = graph.pretrain_steps
    plan = Plan(
        pipeline=spec.name, model_type=shape.model_type, params=shape.params,
        non_embedding_params=shape.non_embedding, vocab_size=shape.vocab, layers=shape.layers,
        hidden=shape.hidden, pretrain=_training_plan("pretrain", p, p.seq_len, pre_steps, shape, embedded=embedded),
        eval_models=list(spec.evaluate.models), cluster=spec.cluster.address or "embedded local Ray",
    )
    for d in spec.finetune.domains:
        seq_len = spec.domain_seq_len(d)
        trainable = shape.params if d.method == "full" else max(1, shape.params // 100)
        plan.domains[d.name] = _training_plan(d.name, d, seq_len, d.steps, shape, trainable, embedded)
        plan.domain_methods[d.name] = d.method
    by_name = {d.name: d for d in spec.finetune.domains}
    for node in graph:
        if node.kind in (Kind.FINETUNE, Kind.SCRATCH):
            t = node.section
            lora = t.method == "lora"
            tp = _training_plan(node.domain, t, node.seq_len, t.steps, shape,
                                max(1, shape.params // 100) if lora else shape.params, embedded)
            engine = (f"ZeRO-{tp.zero_stage} × {tp.workers}" if tp.zero_stage is not None
                      else f"{node.farm} (one base for its members)" if node.farm else "torch") + \
                (", LoRA" if lora else ", from scratch" if node.kind is Kind.SCRATCH else ", full") + \
                f", {tp.precision}"
            plan.jobs.append(JobPlan(node.name, node.domain, node.kind.value, node.workers, tp.resources, engine,
                                     tp.memory_gib * GiB, tp.steps, tp.total_tokens))
    for node in graph.of(Kind.EVALUATE):
        plan.jobs.append(evaluation_plan(spec, node, by_name[node.domain], shape))
    for node in graph:
        if node.entry:  # no memory model of their own: listed with what they run and hold
            plan.others.append(JobPlan(node.name, node.domain or "", node.kind.value, node.workers, node.resources,
                                       node.entry.rpartition(":")[2], 0.0))
    return plan


def planned_precision(t: TrainingSpec, embedded: bool):
    """``core.precision.predict`` for a job of this spec: the decided precision, or None
    where only the workers can tell (a remote cluster's CPUs, an unnamed GPU type)."""
    from branchout.core.precision import predict

    r = t.resources_per_worker
    return predict(t.deepspeed.precision, r.uses_gpu, r.accelerator, embedded)


def evaluation_plan(spec: PipelineSpec, node: Node, d, shape: ModelShape) -> JobPlan:
    """The evaluation of domain ``d``: one worker of the domain's fine-tune, its precision.

    The job scores one model at a time, so it needs one model's weights in the scoring
    dtype (16 bits for bf16; fp16 only on a GPU), plus a batch's inference activations.
    """
    from branchout.cluster.gpu_memory import inference_bytes

    r = d.resources_per_worker
    known = planned_precision(d, spec.cluster.address is None)
    # not known: a GPU scores in 16 bits either way (bf16 or fp16); a CPU is counted at 4 bytes
    precision = known.used if known else ("bf16" if r.uses_gpu else "fp32")
    sixteen = precision == "bf16" or (precision == "fp16" and r.uses_gpu)
    ev = spec.evaluate
    memory = inference_bytes(shape.params, spec.domain_seq_len(d), ev.batch_size, shape.hidden, shape.vocab,
                             2 if sixteen else 4)
    if d.method == "lora":
        memory += 4 * max(1, shape.params // 100)  # the adapter, in fp32
    label = {"bf16": "bf16", "fp16": "fp16" if r.uses_gpu else "fp32"}.get(precision, "fp32") if known else "auto"
    blocks = ev.max_blocks * len(ev.models)
    return JobPlan(node.name, d.name, node.kind.value, node.workers, node.resources,
                   f"score {', '.join(ev.models)} in {label}", memory, 0, blocks * spec.domain_seq_len(d))


def job_state_bytes(option, params: int, trainable: int, largest_layer: int, workers: int, mixed: bool,
                    deepspeed: bool, on_gpu: bool) -> float:
    """Weights, gradients and optimizer state of one worker.

    DeepSpeed: its own accounting (``cluster.gpu_memory.model_states``) of what trains, plus a
    LoRA job's frozen base. The plain torch engine keeps fp32 master weights, gradients
    and Adam moments (16 bytes per trained parameter) and, under autocast, the 16-bit
    copies of the weights a step casts (2 bytes); a LoRA job's frozen base is stored in
    16 bits on a GPU (``TorchEngine`` casts it) and used in place, in fp32, on the CPU.
    """
    from branchout.cluster.gpu_memory import model_states

    frozen = params - trainable if trainable < params else 0
    base_bytes = 2 if (mixed and (deepspeed or on_gpu)) else 4
    if deepspeed:
        return model_states(option, trainable, largest_layer, workers, mixed) + base_bytes * frozen
    if frozen:
        return base_bytes * params + 16 * trainable
    return (18 if mixed else 16) * params


def _training_plan(name: str, t: TrainingSpec, seq_len: int, steps: int, shape: ModelShape,
                   trainable: int | None = None, embedded: bool = True) -> TrainingPlan:
    from branchout.cluster.gpu_memory import ZeroOption, activation_bytes
    from branchout.core.precision import UNDECIDED

    accum = t.global_batch_size // (t.num_workers * t.micro_batch_size)
    zero = int(t.deepspeed.zero_stage) if t.uses_deepspeed() else None
    option = ZeroOption(zero or 0, t.deepspeed.offload_optimizer, t.deepspeed.offload_params)
    known = planned_precision(t, embedded)
    # not known yet: count 16-bit copies too, the larger of the two for the plain engine and ZeRO
    mixed = known.used != "fp32" if known else True
    states = job_state_bytes(option, shape.params, trainable or shape.params, shape.largest_layer,
                             t.num_workers, mixed, zero is not None, t.resources_per_worker.uses_gpu)
    acts = activation_bytes(seq_len, t.micro_batch_size, shape.hidden, shape.layers, shape.vocab, mixed,
                            t.activation_checkpointing)
    return TrainingPlan(
        name=name, workers=t.num_workers, micro_batch=t.micro_batch_size, grad_accum=accum,
        seq_len=seq_len, steps=steps, checkpoint_every=t.checkpoint_every, zero_stage=zero,
        precision=known.used if known else "auto", resources=t.resources_per_worker.ray_bundle(),
        memory_gib=(states + acts) / GiB,
        precision_why=(("auto: " if known.requested == "auto" else "") + known.reason
                       if known and known.reason != "as configured" else "" if known else UNDECIDED),
        precision_warning=known.warning if known else None,
    )


def size_farms(spec: PipelineSpec) -> list[str]:
    """How many LoRA members one adapter farm holds on its domains' GPU, where the GPU type
    is known: the frozen base once (16-bit on a GPU), and per member its adapter's weights,
    gradients and Adam moments (16 bytes a parameter) and the activations of its micro-batch
    (a farm runs every member's rows through each layer at once). Recorded in
    ``spec.farm_capacity`` for ``core.graph.farm_groups``; returns a note per GPU type where
    it is below ``FARM_MAX``."""
    from branchout.cluster.gpu_memory import GB, activation_bytes, usable_bytes
    from branchout.core.graph import FARM_MAX, farm_blockers

    candidates = [d for d in spec.finetune.domains if d.farm is not False and not farm_blockers(d)
                  and d.resources_per_worker.uses_gpu and _gpu_memory(d) is not None]
    if not candidates:
        return []
    shape = model_shape(spec)
    notes = {}
    for d in candidates:
        known = planned_precision(d, spec.cluster.address is None)
        mixed = known.used != "fp32" if known else True
        base = (2 if mixed else 4) * shape.params
        member = 16 * max(1, shape.params // 100) + activation_bytes(
            spec.domain_seq_len(d), d.micro_batch_size, shape.hidden, shape.layers, shape.vocab, mixed)
        share = usable_bytes(_gpu_memory(d)) * min(1.0, d.resources_per_worker.gpu)
        capacity = max(0, int((share - base) // member))
        spec.farm_capacity[d.name] = capacity
        if capacity < FARM_MAX:
            label = d.resources_per_worker.accelerator or f"{_gpu_memory(d):g} GB GPU"
            notes[(label, capacity)] = (
                f"finetune.farm: {d.resources_per_worker.gpu:g} × {label} holds {capacity} LoRA member(s) of an "
                f"adapter farm (the base once, {base / GB:.1f} GB; {member / GB:.2f} GB a member): "
                + ("farms of at most that many" if capacity >= 2 else "these domains train alone"))
    return list(notes.values())


def check_packing(spec: PipelineSpec) -> list[str]:
    """Refuse GPU placements that cannot hold the jobs that will run on them.

    Every fan-out job (fine-tunes and from-scratch baselines run at the same time, on the
    same bundles) and every evaluation job is checked against its GPU: a fractional share
    ``gpu: g`` packs ``⌊1/g⌋`` jobs on one GPU, each of which may be the biggest job of that
    share, so each must fit the usable memory divided by that count; a job with a whole
    GPU or more must fit one GPU (the single-worker engine uses one device). Checked only
    where the GPU type is known (``accelerator`` or ``gpu_memory_gb``). Mixing shares that
    do not divide one GPU evenly (0.4 next to 0.2) is checked per share, not per mix.

    Returns:
        One line per problem: ``evaluate.models`` when only the from-scratch baselines do
        not fit (the usual case: a baseline trains every weight of the model), otherwise
        ``finetune.domains.<i>.resources_per_worker.gpu`` per domain.
    """
    from branchout.cluster.gpu_memory import GB, usable_bytes

    gpu_domains = [(i, d) for i, d in enumerate(spec.finetune.domains)
                   if d.resources_per_worker.uses_gpu and _gpu_memory(d) is not None]
    if not gpu_domains:
        return []
    plan = build_plan(spec)
    problems, scratch_only = [], []
    for i, d in gpu_domains:
        r, memory = d.resources_per_worker, _gpu_memory(d)
        per_gpu = int(1 / r.gpu + 1e-9) if r.gpu < 1 else 1
        share = usable_bytes(memory) / per_gpu
        label = r.accelerator or f"{memory:g} GB GPUs"
        over = [j for j in plan.jobs if j.domain == d.name and j.memory_bytes > share]
        if not over:
            continue
        if [j.kind for j in over] == ["scratch"]:
            scratch_only.append((d, over[0], per_gpu, share, label))
            continue
        worst = max(over, key=lambda j: j.memory_bytes)
        names = ", ".join(j.name for j in over)
        advice = ("evaluate.batch_size, or more of a GPU" if [j.kind for j in over] == ["evaluate"] else
                  "micro_batch_size, seq_len, method: lora")
        packing = (f"{r.gpu:g} packs {per_gpu} jobs per GPU, {per_gpu} × {worst.memory_bytes / GB:.1f} GB"
                   if per_gpu > 1 else f"one job per GPU, {worst.memory_bytes / GB:.1f} GB")
        problems.append(
            f"finetune.domains.{i}.resources_per_worker.gpu: {packing} > {usable_bytes(memory) / GB:.1f} GB "
            f"usable on {label} ({names}); give each job more of a GPU or less memory ({advice})")
    if scratch_only:
        d, job, per_gpu, share, label = scratch_only[0]
        domains = ", ".join(s[0].name for s in scratch_only)
        problems.insert(0, (
            f"evaluate.models: 'scratch' trains the {plan.params / 1e9:.2f}B-parameter model from scratch for "
            f"each domain on its fine-tune's resources ({d.num_workers} worker(s) with "
            f"{d.resources_per_worker.gpu:g} × {label} each; {job.engine}): {job.memory_bytes / GB:.1f} GB "
            f"per job > {share / GB:.1f} GB it can have "
            f"({domains}); remove 'scratch' from evaluate.models, or give the domains more GPUs "
            "(num_workers > 1 trains with DeepSpeed ZeRO)"))
    return problems
