"""The pipeline spec: one set of pydantic models, loaded from one YAML file.

Every model forbids unknown keys, so a typo is an error rather than a setting that is
silently ignored. Field-level checks live on the fields; checks that span sections
(batch arithmetic, positions vs. sequence length, LoRA targets vs. model type) live in
``orchestrator.config.checks`` so that the loader can report every problem of a file at once.

Glossary:
    block         ``seq_len`` consecutive token ids; the unit the data is packed into.
    micro-batch   blocks one worker feeds through forward/backward at once.
    global batch  blocks per optimizer step, summed over workers and accumulation.
    domain        one fine-tune target (legal, code, ...), with its own dataset.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

MAX_STEPS = 10**9  # optimizer steps: more is a typo (a year at 30 steps/s)


class StrictModel(BaseModel):
    """Base for every spec section: unknown keys are errors, values are not coerced.

    pydantic's lax mode would take ``"12"``, ``true`` or ``12.0`` for a count and ``"yes"`` for
    a switch; here a count must be an integer, a number is not a boolean, a switch is not a
    string. One coercion stays: a number written as a string, because YAML 1.1 reads ``3e-4``
    (no dot) as one. Every float must be finite.
    """

    model_config = ConfigDict(extra="forbid", strict=False, validate_default=True)

    @field_validator("*", mode="before")
    @classmethod
    def _not_coerced(cls, v: Any, info):
        kinds = _scalar_kinds(cls.model_fields[info.field_name].annotation)
        if not kinds or v is None:
            return v
        numeric = kinds & {int, float}
        if isinstance(v, bool) and bool not in kinds and numeric:
            raise ValueError("expected a number, not true/false")
        whole_only = int in kinds and float not in kinds and not isinstance(v, bool)
        if whole_only and (isinstance(v, float) or (isinstance(v, str) and str not in kinds)):
            raise ValueError("expected a whole number")
        if bool in kinds and isinstance(v, str) and str not in kinds:
            raise ValueError("expected true or false")
        if float in kinds and isinstance(v, float | str) and not isinstance(v, bool):
            try:
                number = float(v)
            except ValueError:
                return v  # not a number at all: pydantic says so
            if not math.isfinite(number):
                raise ValueError("must be a finite number")
        return v



def _scalar_kinds(annotation) -> set:
    """The scalar types (int, float, bool, str) a field's annotation admits, through Optional,
    unions and Literal; empty for anything else (models, lists, dicts)."""
    import types
    import typing

    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_scalar_kinds(a) for a in typing.get_args(annotation)))
    if origin is typing.Literal:
        return {type(a) for a in typing.get_args(annotation)}
    if origin is typing.Annotated:
        return _scalar_kinds(typing.get_args(annotation)[0])
    return {annotation} & {int, float, bool, str}


class Resources(StrictModel):
    """Ray resources one worker (or one single-worker job) reserves."""

    cpu: float = Field(1.0, ge=0, description="CPUs per worker; fractions pack jobs.")
    gpu: float = Field(0.0, ge=0, description="GPUs per worker; 0 trains on the CPU.")
    custom: dict[str, float] = Field(default_factory=dict, description="Extra Ray resources.")
    accelerator: str | None = Field(
        None, description="GPU type, e.g. H100-80GB: the memory planner's budget (see `branchout plan`), "
        "and where Ray places the job (only on nodes with that `accelerator_type`)."
    )
    gpu_memory_gb: float | None = Field(
        None, gt=0, description="Memory of one GPU in GB, for GPU types the planner does not know."
    )

    @property
    def uses_gpu(self) -> bool:
        return self.gpu > 0

    def ray_bundle(self) -> dict[str, float]:
        """The resource dict Ray Train / ``.options()`` expects.

        A GPU job with an ``accelerator`` asks for Ray's ``accelerator_type:<type>`` resource
        (what ``accelerator_type=`` on a task adds), which only nodes with that GPU have:
        without it a job planned for an 80 GB H100 could land on a 24 GB L4 node.
        """
        bundle = {"CPU": self.cpu, **self.custom}
        if self.gpu:
            bundle["GPU"] = self.gpu
            if self.accelerator:
                from branchout.core.accelerators import ray_accelerator_type

                # Ray's own share for an accelerator-type constraint: a node has 1 of it
                bundle.setdefault(f"accelerator_type:{ray_accelerator_type(self.accelerator)}", 0.001)
        return bundle


class DatasetSpec(StrictModel):
    """Text, JSONL, Parquet or CSV files (local or object-store URIs), or a hub dataset.

    Files are read in ranges by the data stage's workers, never whole; a hub dataset is
    streamed shard by shard, pinned to the commit its revision points at. In plain text a
    blank line ends a document.
    """

    path: str = Field(description="File, directory, glob, object-store URI or prefix, or hub dataset name.")
    format: Literal["auto", "text", "json", "parquet", "csv", "hub"] = Field(
        "auto", description="'auto' infers from the file extension; 'hub' loads by name."
    )
    text_column: str = Field("text", min_length=1, description="The column of plain text.")
    prompt_column: str | None = Field(
        None, min_length=1, description="Instruction data (fine-tune domains): the column of prompts; "
        "needs `response_column`. The domain trains on responses only (supervised fine-tuning)."
    )
    response_column: str | None = Field(None, min_length=1, description="The column of answers to `prompt_column`.")
    messages_column: str | None = Field(
        None, min_length=1, description="Instruction data as chat: a column of message lists "
        "([{role, content}, …]); every assistant message is trained on, the rest is context."
    )
    split: str = Field("train", description="Split to read (hub datasets).")
    revision: str | None = Field(None, description="Hub revision to pin (hub datasets).")

    @model_validator(mode="after")
    def _text_or_instructions(self) -> DatasetSpec:
        pair = (self.prompt_column is not None, self.response_column is not None)
        if pair[0] != pair[1]:
            raise ValueError("`prompt_column` and `response_column` go together: name both")
        if self.messages_column is not None and any(pair):
            raise ValueError("give `messages_column` (chat) or `prompt_column`/`response_column`, not both")
        if self.is_instruction and "text_column" in self.model_fields_set:
            raise ValueError("`text_column` is for plain text; instruction data reads "
                             "`prompt_column`/`response_column` or `messages_column`")
        return self

    @property
    def is_instruction(self) -> bool:
        """Prompt/response pairs or chat messages: a supervised fine-tune, not a token stream."""
        return self.prompt_column is not None or self.messages_column is not None


class SourceSpec(DatasetSpec):
    """One corpus of a pretraining mixture (``pretrain.datasets``): a dataset, its name and
    its share of the training blocks."""

    name: str = Field(description="The source's name: its data job is data/pretrain/<name>, its held-out "
                      "set general/<name>.")
    weight: float = Field(gt=0, description="Its share of every stretch of training blocks, relative to the "
                          "other sources' weights (normalised to sum to 1).")

    @field_validator("name")
    @classmethod
    def _slug(cls, v: str) -> str:
        return _check_slug(v)


class TokenizerSpec(StrictModel):
    """Train a byte-level BPE on a sample of the pretraining corpus, or load an existing one."""

    path: str | None = Field(None, description="Existing tokenizer directory; skips training.")
    vocab_size: int = Field(8192, ge=300, le=1_000_000)
    min_frequency: int = Field(2, ge=1)
    sample_bytes: int = Field(
        100_000_000, ge=1_000_000,
        description="Text the tokenizer trains on at most: a seeded sample of the pretraining "
                    "corpus's training documents (all of them when the corpus is smaller).",
    )


class ModelSpec(StrictModel):
    """The causal LM: a new one built from its config class (``type`` + ``config``), or an
    existing checkpoint (``path``) whose own config.json decides the architecture."""

    type: str | None = Field(None, description="A model type known to transformers.AutoConfig (default llama).")
    config: dict[str, Any] = Field(
        default_factory=dict, description="Overrides of the config class's fields."
    )
    path: str | None = Field(
        None, description="An existing HF model directory (or hub id) to start from: the pretrain continues "
        "it (pretrain.steps: 0 branches the fan-out straight from it); its tokenizer is used unless "
        "tokenizer.path names another."
    )
    revision: str | None = Field(None, description="Hub revision (commit, tag) of `path` to pin.")

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if self.path is not None and (self.type is not None or self.config):
            raise ValueError("give either `path` (start from an existing model) or `type`/`config` "
                             "(build a new one), not both: the model's config.json decides its architecture")
        if self.revision is not None and self.path is None:
            raise ValueError("`revision` pins a hub `path`; there is none")
        if self.path is None and self.type is None:
            self.type = "llama"
        return self


class OptimizerSpec(StrictModel):
    """AdamW; weight decay applies to matrices only (not biases or norm weights)."""

    lr: float = Field(3e-4, gt=0, le=10)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0, description="Max grad norm; 0 disables clipping.")
    fused: Literal["auto"] | bool = Field(
        "auto", description="torch's fused AdamW step (one kernel for every parameter). auto: on a GPU; "
        "CPUs keep the multi-tensor (foreach) step."
    )

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError("each beta must be in [0, 1)")
        return v


class ScheduleSpec(StrictModel):
    """Linear warmup, then cosine decay to ``min_lr_ratio`` × lr; or warmup-stable-decay."""

    kind: Literal["cosine", "wsd"] = Field(
        "cosine", description="cosine: decay over the whole run. wsd (warmup-stable-decay): constant after the "
        "warmup, then a linear cooldown to min_lr_ratio over the last cooldown_fraction of the run (or after "
        "pretrain.stop ends it early): checkpoints before the cooldown are comparable, which probes need."
    )
    warmup_steps: int = Field(10, ge=0, le=MAX_STEPS)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    cooldown_fraction: float = Field(0.1, gt=0, le=1, description="wsd: the share of the steps the cooldown takes.")


class DeepSpeedSpec(StrictModel):
    """DeepSpeed settings for multi-worker training; ``config`` passes any other key through."""

    @field_validator("zero_stage", mode="before")
    @classmethod
    def _stage(cls, v: Any) -> Any:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 3):
            return v
        raise ValueError("must be 0, 1, 2, 3 or 'auto'")

    zero_stage: int | Literal["auto"] = Field(
        2, description="0-3, or 'auto': the cheapest stage/offload that fits the GPU (memory planner)."
    )
    offload_optimizer: bool = Field(False, description="ZeRO-Offload optimizer states to CPU.")
    offload_params: bool = Field(False, description="Offload parameters to CPU (ZeRO-3 only).")
    precision: Literal["auto", "bf16", "fp32", "fp16"] = Field(
        "auto", description="'auto': bf16 where the job's hardware does bf16 natively (GPUs from Ampere on; "
        "CPUs with AVX512-BF16 or AMX), else fp16 with loss scaling on a GPU, fp32 on a CPU; decided on the "
        "job's workers (core/precision.py)."
    )
    engine: Literal["auto", "deepspeed"] = Field(
        "auto", description="'auto': DeepSpeed where it has work (several workers, offload), the plain "
        "torch engine for one worker otherwise; 'deepspeed': always DeepSpeed."
    )
    config: dict[str, Any] = Field(
        default_factory=dict, description="Raw DeepSpeed config keys, merged last."
    )


class TrainingSpec(StrictModel):
    """What pretrain and fine-tune share: batch arithmetic, workers, optimizer, schedule."""

    seq_len: int | None = Field(None, ge=8, description="Tokens per block.")
    global_batch_size: int = Field(32, ge=1, description="Blocks per optimizer step.")
    micro_batch_size: int = Field(4, ge=1, description="Blocks per worker per forward.")
    num_workers: int = Field(1, ge=1, le=4096)
    resources_per_worker: Resources = Field(default_factory=Resources)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    checkpoint_every: int = Field(100, ge=1, description="Optimizer steps between checkpoints.")
    keep_checkpoints: int = Field(2, ge=1, description="Newest checkpoints kept.")
    max_failures: int = Field(
        2, ge=0, description="Ray Train restarts of the worker group after a worker dies (multi-worker only)."
    )
    activation_checkpointing: bool = Field(
        False, description="Recompute each layer's activations in backward instead of keeping them: "
        "~1/3 more compute for a fraction of the activation memory (packs more LoRA jobs per device)."
    )
    log_every: int = Field(10, ge=1)
    eval_every: int | None = Field(
        None, ge=1, description="Optimizer steps between held-out scorings on the training workers (and at the "
        "last step): the mean token loss of a fixed sample of the held-out blocks (each source's for a "
        "pretraining mixture, the domain's for a fine-tune), logged as eval_loss beside the training loss "
        "(metrics, TensorBoard, MLflow, the report). null: none."
    )
    eval_blocks: int = Field(32, ge=1, description="Held-out blocks (instruction data: examples) in that sample, "
                             "at most; spread over the held-out set, the same at every scoring.")
    nan_rollbacks: int = Field(
        2, ge=0, le=100, description="A non-finite loss rolls the job back to its last checkpoint, skips the "
        "batches it had read since (the bad one among them) and multiplies the learning rate by nan_lr_factor; "
        "at most this many times, then the job fails. 0: fail at once."
    )
    nan_lr_factor: float = Field(0.5, gt=0, le=1, description="Learning-rate factor of each NaN rollback.")
    compile: Literal["auto"] | bool = Field(
        "auto", description="torch.compile each decoder layer in place (fuses its elementwise work; the "
        "weights' names are unchanged). auto: on a GPU, with the plain engine, for jobs of at least "
        "500 optimizer steps, where the compile (tens of seconds) pays for itself. true also compiles "
        "under DeepSpeed (its engine.compile)."
    )
    fused_kernels: bool = Field(
        False, description="Liger kernels (fused linear cross-entropy, RMSNorm, SwiGLU, RoPE) for the "
        "architectures Liger supports; needs the liger-kernel package on the workers. Off by default: on an "
        "H200 with compiled layers they halved the step rate (benchmarks/RESULTS.md, GPU rows)."
    )
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of initialisation, data order and dropout.")

    def uses_deepspeed(self) -> bool:
        """DeepSpeed when it has something to do: ZeRO across several workers, or offload.
        One worker otherwise trains with the plain torch engine, which does the same
        arithmetic (fp16 with torch's loss scaler) without DeepSpeed's per-step overhead.
        Precision does not enter: ``auto`` is decided on the workers, after this choice."""
        ds = self.deepspeed
        return ds.engine == "deepspeed" or self.num_workers > 1 or ds.offload_optimizer or ds.offload_params


class ProbeSpec(StrictModel):
    """Probe fine-tunes of every domain from the running pretrain (``pretrain.probes``)."""

    at: list[float] | None = Field(
        None, description="Probe points as fractions of the pretrain's steps (default 1/16, 1/8, 1/4, 1/2, 3/4, 1); "
        "or give `every`."
    )
    every: int | None = Field(None, ge=1, description="A probe point every this many pretrain steps.")
    steps: int = Field(50, ge=1, le=MAX_STEPS, description="Optimizer steps of each probe fine-tune (its domain's other options).")
    method: Literal["lora", "full", "domain"] = Field(
        "lora", description="How each probe fine-tunes: `lora` (cheap: no optimizer state for the base), `full`, or "
        "`domain`: each domain's own `method`, so the probe predicts the fine-tune it will get (a full probe holds "
        "the whole model's optimizer state on the pretrain's workers).")

    @field_validator("at")
    @classmethod
    def _fractions(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (not v or any(not 0 < f <= 1 for f in v)):
            raise ValueError("probe points are fractions of the pretrain in (0, 1]")
        return sorted(set(v)) if v else v

    @model_validator(mode="after")
    def _one_way(self) -> ProbeSpec:
        if self.at is not None and self.every is not None:
            raise ValueError("give `at` (fractions) or `every` (steps), not both")
        return self

    def points(self, steps: int) -> list[int]:
        """The pretrain steps probed, in order."""
        if self.every is not None:
            return list(range(self.every, steps + 1, self.every))
        fractions = self.at or [1 / 16, 1 / 8, 1 / 4, 1 / 2, 3 / 4, 1]
        return sorted({max(1, round(f * steps)) for f in fractions})


class StopSpec(StrictModel):
    """End the pretrain once probes say that the rest of its budget no longer helps."""

    when: Literal["saturated"] = Field("saturated", description="Every domain saturated: its forecast gain of the "
                                       "remaining budget is below `epsilon` at `patience` probe points in a row, or its "
                                       "best probe loss improved over the last `patience` points at a rate that would "
                                       "gain less than `epsilon` by the budget's end (a curve that turned back up gains "
                                       "nothing).")
    epsilon: float = Field(0.01, gt=0, description="The relative gain of the remaining budget below which a "
                           "domain is saturated.")
    patience: int = Field(2, ge=1, description="Probe points in a row a forecast must hold, and the window the "
                          "best probe loss's recent improvement is measured over.")
    weights: dict[str, float] = Field(default_factory=dict, description="Domain → weight of its gain (default 1).")


class PretrainSpec(TrainingSpec):
    """The one expensive stage: a model trained from scratch with DeepSpeed on Ray Train."""

    dataset: DatasetSpec | None = Field(None, description="The general corpus (also trains the tokenizer); "
                                        "or give `datasets`.")
    datasets: list[SourceSpec] | None = Field(
        None, min_length=2, description="A mixture of corpora instead of `dataset`: each is tokenized and split "
        "on its own (its own cache key and held-out set); training blocks interleave them by weight, decided by "
        "the step alone, so a resumed pretrain reads what it would have and a new weight re-tokenizes nothing. "
        "The tokenizer trains on an equal share of each source (so a new weight keeps it)."
    )
    seq_len: int = Field(256, ge=8)
    steps: int | None = Field(None, ge=0, le=MAX_STEPS, description="Optimizer steps, or give `tokens`; 0 skips pretraining "
                              "(the fan-out branches straight from model.path).")
    tokens: int | None = Field(None, ge=1, le=10**16, description="Token budget; steps are derived.")
    probes: ProbeSpec | None = Field(
        None, description="At probe points the pretrain's workers fine-tune every domain briefly from the current "
        "weights and score it on the domain's held-out text: eval/forecast.json fits each domain's probe loss "
        "against pretraining tokens (loss = E + A·T^-α) from the curve's steepest fall on, and forecasts the end of "
        "the budget once four points are past it (a short pretrain's transient can span its first quarter: "
        "`every` places enough points there)."
    )
    stop: StopSpec | None = Field(None, description="With probes: stop the pretrain (then cool down) once the "
                                  "rest of its budget no longer helps any domain (see `when`).")

    @model_validator(mode="after")
    def _steps_or_tokens(self) -> PretrainSpec:
        if (self.steps is None) == (self.tokens is None):
            raise ValueError("give exactly one of `steps` or `tokens`")
        if (self.dataset is None) == (self.datasets is None):
            raise ValueError("give exactly one of `dataset` (one corpus) or `datasets` (a mixture)")
        names = [s.name for s in self.datasets or []]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"datasets: source names must be unique; repeated: {', '.join(dupes)}")
        if self.stop is not None and self.probes is None:
            raise ValueError("`stop` acts on the probes' forecasts: set `probes` too")
        return self


class LoraSpec(StrictModel):
    """LoRA adapters through peft; only the adapters train, the base stays frozen."""

    rank: int = Field(8, ge=1, le=4096)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = Field(
        None, description="Module names to adapt; default depends on the model type."
    )


class EarlyStopSpec(StrictModel):
    """Stop a fine-tune whose held-out loss stopped improving (needs ``eval_every``)."""

    patience: int = Field(ge=1, description="Scorings in a row without a new best held-out loss before it stops.")
    min_delta: float = Field(0.0, ge=0, description="A new best must be lower than the old by more than this.")


class FinetuneOptions(TrainingSpec):
    """Options of one domain fine-tune; ``finetune.defaults`` and each domain's overrides."""

    method: Literal["full", "lora"] = "full"
    steps: int = Field(100, ge=1, le=MAX_STEPS)
    global_batch_size: int = Field(8, ge=1)
    lora: LoraSpec = Field(default_factory=LoraSpec)
    max_retries: int = Field(2, ge=0, description="Retries of a failed domain job (each resumes from its newest good checkpoint).")
    replay: float = Field(
        0.0, ge=0, lt=1, description="Share of every step's blocks drawn from the pretraining corpus's training "
        "blocks (a mixture's sources by their weights) instead of the domain's: replayed general text limits "
        "what a fine-tune forgets of it. Text domains only; the from-scratch baseline trains on the domain alone."
    )
    keep_best: bool = Field(
        True, description="With eval_every: the exported model is the checkpoint with the lowest held-out loss "
        "(saved when it is scored, kept past keep_checkpoints), not the last step's."
    )
    early_stop: EarlyStopSpec | None = Field(
        None, description="With eval_every: end training once the held-out loss has not improved for `patience` "
        "scorings; the run records where it stopped."
    )
    farm: Literal["auto"] | bool = Field(
        "auto", description="Adapter farm: LoRA domains that share the block length, precision, bundle and "
        "LoRA targets train together in one process holding the base once, each still its own job (own "
        "optimizer, schedule, checkpoints, record). auto: farm two or more such domains; true: farm this "
        "domain (an error where it cannot be); false: train it alone."
    )


class DomainSpec(FinetuneOptions):
    """One domain: its name and dataset, plus any FinetuneOptions overriding the defaults."""

    name: str = Field(description="Domain name; its outputs go to finetune/<name>/.")
    dataset: DatasetSpec = Field(description="The domain's text.")

    @field_validator("name")
    @classmethod
    def _slug(cls, v: str) -> str:
        return _check_slug(v)


class FinetuneSpec(StrictModel):
    """The fan-out: one job per domain, all started from the pretrained base."""

    defaults: FinetuneOptions = Field(default_factory=FinetuneOptions)
    domains: list[DomainSpec] = Field(default_factory=list)
    max_concurrent: int | None = Field(
        None, ge=1, description="Cap on domain jobs in flight; default: what the cluster holds."
    )
    warm_pool: bool = Field(
        True, description="Run single-worker jobs and the evaluations on long-lived warm actors that "
        "share the base weights through the object store (false: one Ray task per job)."
    )

    @model_validator(mode="before")
    @classmethod
    def _merge_defaults(cls, data: Any) -> Any:
        # Domains inherit every default they do not set; nested sections merge key by key
        # so `lora: {rank: 16}` keeps the default alpha.
        if not isinstance(data, dict):
            return data
        defaults = data.get("defaults") or {}
        domains = data.get("domains")
        if isinstance(defaults, dict) and isinstance(domains, list):
            data = {**data, "domains": [
                deep_merge(defaults, d) if isinstance(d, dict) else d for d in domains
            ]}
        return data

    @field_validator("domains")
    @classmethod
    def _unique_names(cls, v: list[DomainSpec]) -> list[DomainSpec]:
        names = [d.name for d in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"domain names must be unique; repeated: {', '.join(dupes)}")
        return v


EvalModel = Literal["base", "finetuned", "scratch"]


class LmEvalSpec(StrictModel):
    """EleutherAI's lm-evaluation-harness on the base and every fine-tune, beside perplexity."""

    tasks: list[str] = Field(min_length=1, description="Harness task or group names (its own, or defined in "
                             "`include_path`); checked before anything starts.")
    include_path: str | None = Field(
        None, description="A directory of task YAML files of your own (e.g. a multiple-choice set from local "
        "JSONL through `dataset_path: json`); it and the files its tasks name must be readable where the jobs run."
    )
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples; null: each task's default.")
    limit: int | None = Field(None, ge=1, description="Examples per task at most; null: all.")
    batch_size: int = Field(8, ge=1)


class EvaluateSpec(StrictModel):
    """Held-out perplexity per domain (instruction domains: of the responses), greedy answers to
    held-out prompts; the held-out split also shapes every training set."""

    heldout_fraction: float = Field(
        0.1, gt=0, lt=0.5, description="Share of each dataset's documents held out."
    )
    split_seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of the document-level held-out split.")
    min_heldout_docs: int = Field(
        10, ge=0, description="Below this many held-out documents (after near-duplicates of training text "
        "moved to training) a dataset's scores are flagged as unreliable: on the terminal, in `status` and "
        "in the report's warnings."
    )
    min_heldout_tokens: int = Field(512, ge=0, description="The same floor in held-out tokens.")
    models: list[EvalModel] = Field(default_factory=lambda: ["base", "finetuned", "scratch"])
    max_blocks: int = Field(256, ge=1, description="Held-out blocks (instruction data: examples) scored per "
                            "domain at most.")
    batch_size: int = Field(8, ge=1)
    generation_samples: int = Field(
        8, ge=0, le=256, description="Held-out prompts every model answers greedily, per domain: instruction "
        "domains score the answers (exact_match, rouge_l); every domain shows them in the report. 0: none."
    )
    max_new_tokens: int = Field(
        32, ge=1, le=4096, description="Tokens generated per answer at most; a prompt keeps its last "
        "max-positions − max_new_tokens tokens."
    )
    cross: bool = Field(
        False, description="Also score every model on every other domain's held-out text and on the pretraining "
        "corpus's ('general'): what a fine-tune forgot and what it transfers. eval/metrics.json gains 'cross' "
        "(model → held-out set → perplexity) and the report a heatmap; one 'cross' job per domain and one for "
        "the base."
    )
    lm_eval: LmEvalSpec | None = Field(
        None, description="Also run lm-evaluation-harness tasks on the base and each fine-tune (one 'lm_eval' job "
        "per model, on its fine-tune's resources, e.g. a GPU); eval/metrics.json gains 'lm_eval' "
        "(model → task → metric) and the report a table."
    )
    forgetting: float = Field(
        0.1, gt=0, le=10, description="With cross: a fine-tune whose general-text perplexity exceeds the base's "
        "by more than this share is named in the report's findings as having forgotten it."
    )

    @field_validator("models")
    @classmethod
    def _non_empty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("name at least one model to score")
        return list(dict.fromkeys(v))


class ClusterSpec(StrictModel):
    """Where Ray runs."""

    address: str | None = Field(
        None, description="null starts an embedded local Ray; else 'auto' or ray://host:port."
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the embedded Ray only.")
    num_gpus: int | None = Field(None, ge=0, description="GPUs of the embedded Ray only.")
    autoscaling: bool = Field(
        False, description="The cluster adds nodes on demand: requests beyond today's nodes wait instead "
        "of failing, and each stage's capacity is requested ahead (ray.autoscaler.sdk.request_resources)."
    )
    request_ahead: bool = Field(
        True, description="With autoscaling: request each stage's nodes before it needs them."
    )
    capacity_timeout_s: float = Field(
        300, gt=0, description="After this long queued, a job says what it is waiting for (and again every period)."
    )


class TrackingSpec(StrictModel):
    """Experiment tracking beyond the TensorBoard files every run writes (logs/tensorboard)."""

    mlflow_uri: str | None = Field(
        None, description="MLflow tracking server, e.g. http://mlflow:5000: a parent run per pipeline run, "
        "a child per job with its step metrics, final metrics and the report."
    )
    experiment: str | None = Field(None, description="MLflow experiment; default: the pipeline name.")


class PipelineSpec(StrictModel):
    """One pipeline: tokenizer → pretrain → per-domain fine-tunes → evaluation."""

    name: str = Field(description="Pipeline name; runs go to <storage>/<name>/<run id>/.")
    description: str = Field("", description="Free text shown in listings.")
    storage: str = Field("./runs", description="Directory or URI under which runs are written.")
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    pretrain: PretrainSpec
    finetune: FinetuneSpec = Field(default_factory=FinetuneSpec)
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)

    @field_validator("name")
    @classmethod
    def _slug(cls, v: str) -> str:
        return _check_slug(v)

    @model_validator(mode="after")
    def _tokenizer_of_the_model(self) -> PipelineSpec:
        # an existing model comes with the tokenizer its embeddings were trained with
        if self.model.path is not None and self.tokenizer.path is None:
            self.tokenizer.path = self.model.path
        return self

    # What the loader decided for the user (e.g. the ZeRO stage picked for 'auto'); shown
    # with the plan, never read from or written to the file.
    _notes: list[str] = PrivateAttr(default_factory=list)
    # Adapter farm sizes the memory planner allows, by domain (orchestrator.config.plan.size_farms):
    # how many members one farm on that domain's GPU holds. Absent: core.graph.FARM_MAX.
    _farm_capacity: dict[str, int] = PrivateAttr(default_factory=dict)

    @property
    def notes(self) -> list[str]:
        return self._notes

    @property
    def farm_capacity(self) -> dict[str, int]:
        return self._farm_capacity

    def domain_seq_len(self, domain: DomainSpec) -> int:
        """Fine-tunes use the pretrain block length unless a domain sets its own."""
        return domain.seq_len or self.pretrain.seq_len


_SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _check_slug(v: str) -> str:
    if not _SLUG.fullmatch(v):  # match() with $ took "legal\n"
        raise ValueError(
            "must be 1-64 characters of letters, digits, '_', '.', '-', starting with a letter or digit"
        )
    return v


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` wins; dicts present on both sides are merged recursively."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out
