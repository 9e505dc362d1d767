"""The jobs the driver hands to workers, as typed, picklable objects.

Each kind of job is one frozen description carrying the spec's own models (``TrainingSpec``,
``DatasetSpec``, ``TokenizerSpec``...), never a ``model_dump()`` dict or a positional tuple,
so a worker reads every option, and every default, from ``core/spec.py``:

- ``TokenizerJob`` → ``stages.prepare.tokenizer.tokenizer_job``
- ``DataJob`` → ``stages.prepare.data.prepare``
- ``TrainJob`` → ``stages.training.recipe.train``, entered from Ray Train (``stages.training.distributed.train_worker``)
  or one process (``stages.training.single_worker.run_single_worker``): pretrain, fine-tunes, baselines
- ``ImportJob`` → ``stages.training.model.import_model`` (``pretrain.steps: 0``)
- ``EvalJob`` → ``stages.evaluation.evaluate.evaluate_domain``
- ``NodeJob`` → the function a graph node names (``core.graph.Node.entry``): every kind the
  driver has no stage of its own for, e.g. ``cross`` → ``stages.evaluation.cross.score_elsewhere``
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from branchout import storage
from branchout.core.graph import Node
from branchout.core.spec import (
    DatasetSpec,
    FinetuneOptions,
    PipelineSpec,
    PretrainSpec,
    TokenizerSpec,
)

LEASE = "LEASE"


class LeaseLostError(RuntimeError):
    """Another attempt of the same job owns its directory; this worker must not write."""

JobKind = Literal["pretrain", "finetune", "scratch"]


@dataclass
class TrainJob:
    name: str  # "pretrain", "finetune/legal", "scratch/legal"
    kind: JobKind
    training: PretrainSpec | FinetuneOptions  # the section it trains by (a domain's, with its seq_len)
    steps: int
    model_type: str | None  # None when the model comes from model_path
    model_overrides: dict[str, Any]
    tokenizer_uri: str
    data_uri: str
    out_uri: str  # the job's directory: model/, checkpoints/
    logs_uri: str  # the run's logs/ directory
    run_id: str
    hub_name: str | None = None
    method: Literal["full", "lora"] = "full"  # "full" for a baseline, whatever its domain's method
    base_model_uri: str | None = None  # the parent checkpoint of a fine-tune
    extra: dict[str, Any] = field(default_factory=dict)
    lease: str | None = None  # this attempt's token; see claim() / check_lease()
    tracking: dict[str, str] | None = None  # MLflow {"uri", "run_id"} this job logs its steps to
    model_path: str | None = None  # an existing model the pretrain continues (model.path)
    # pretrain.datasets: (name, packed data, weight) of every source; data_uri is then the first's
    mixture: tuple[tuple[str, str, float], ...] = ()
    # finetune.replay: (name, packed data, share of the blocks) of each pretraining corpus mixed in
    replay: tuple[tuple[str, str, float], ...] = ()
    # pretrain.probes: the domains its workers fine-tune at probe points (stages.training.probes.ProbeTarget)
    probes: tuple = ()
    model_revision: str | None = None
    # False for a probe (stages.training.probes): its worth is its held-out loss, returned; it
    # exports no model and writes no result.json (only its logs)
    export: bool = True

    @property
    def model_uri(self) -> str:
        return storage.join(self.out_uri, "model")

    @property
    def checkpoints_uri(self) -> str:
        return storage.join(self.out_uri, "checkpoints")

    @property
    def slug(self) -> str:
        """The name as a file name (``finetune/legal`` → ``finetune-legal``)."""
        return self.name.replace("/", "-")

    def with_precision(self, precision: str) -> TrainJob:
        """This job with its ``precision: auto`` replaced by the one its workers decided
        (``stages.training.engine.decide_precision``): everything after reads a concrete one."""
        t = self.training
        return replace(self, training=t.model_copy(update={"deepspeed": t.deepspeed.model_copy(
            update={"precision": precision})}))

    def spec(self) -> PretrainSpec | FinetuneOptions:
        """The training section (options, engine, resources) this job trains by."""
        return self.training

    def claim(self) -> None:
        """Driver side, before each attempt is submitted: make this attempt the job's owner.

        Workers outlive a driver that is SIGKILLed (an embedded Ray takes seconds to go
        down with it) and can keep training; a worker whose lease no longer matches stops
        before it publishes, prunes or exports anything, so an orphan never overwrites or
        deletes what the attempt that replaced it reads.
        """
        self.lease = f"{self.run_id}:{uuid.uuid4().hex}"
        storage.write_text(storage.join(self.out_uri, LEASE), self.lease)

    def check_lease(self) -> None:
        """Worker side, before every write into the job's directory.

        Raises:
            LeaseLostError: a newer attempt claimed the job.
        """
        if self.lease is None:
            return  # a job run outside a pipeline driver (tests, benchmarks)
        uri = storage.join(self.out_uri, LEASE)
        current = storage.read_text(uri).strip() if storage.exists(uri) else None
        if current != self.lease:
            raise LeaseLostError(f"{self.name}: a newer attempt owns {self.out_uri}; "
                                 "this worker stops without writing")


@dataclass(frozen=True)
class TokenizerJob:
    """Train a tokenizer on the pretraining corpus's training documents (or copy one in)."""

    tokenizer: TokenizerSpec
    corpora: tuple[tuple[DatasetSpec, float], ...]  # the pretraining corpora (and their weights)
    heldout_fraction: float  # held-out documents never shape the vocabulary they are scored with
    split_seed: int
    out_uri: str


@dataclass(frozen=True)
class DataJob:
    """Tokenize and pack one dataset into blocks of ``seq_len`` (or reuse the data cache)."""

    dataset: DatasetSpec
    tokenizer_uri: str
    tokenizer_hash: str
    seq_len: int
    heldout_fraction: float
    split_seed: int
    cache_root: str  # packed data lives here, keyed by content: runs share it
    # the pretraining corpora's packed data (one, or a mixture's sources): a domain's held-out
    # documents that are mostly their training text are not scored
    reference_uris: tuple[str, ...] = ()
    fingerprint: str | None = None  # the dataset's, when the driver has it (no second hashing)
    name: str = "data"  # the record's job name, e.g. "data/legal"
    hub_name: str | None = None  # the run's progress hub


@dataclass(frozen=True)
class ImportJob:
    """``pretrain.steps: 0``: publish an existing model (``model.path``) as the run's base."""

    path: str
    revision: str | None
    tokenizer_uri: str
    out_uri: str


@dataclass(frozen=True)
class Candidate:
    """One model an evaluation scores: a full model, or LoRA adapters over a base."""

    model_uri: str
    adapter_base_uri: str | None = None


@dataclass(frozen=True)
class EvalJob:
    """Score a domain's held-out blocks with every candidate (name → model), in order."""

    domain: str
    data_uri: str
    candidates: dict[str, Candidate]
    batch_size: int
    max_blocks: int
    threads: int  # torch threads: the CPUs of the bundle it is placed on
    precision: str  # the domain's deepspeed.precision (auto: decided on the worker)
    use_gpu: bool
    tokenizer_uri: str | None  # needed only to generate answers
    generation_samples: int  # held-out prompts each candidate answers (0: none)
    max_new_tokens: int


@dataclass(frozen=True)
class NodeJob:
    """A job run from its graph node alone (``core.graph.Node.entry``): the worker function
    gets the node (its section, the spec model itself), the whole validated spec, and what
    each parent left (its outputs as the run record keeps them, by the parent's role).
    It writes under ``out_uri`` and returns its outputs, a JSON-able dict."""

    node: Node
    spec: PipelineSpec
    inputs: dict[str, dict[str, Any]]  # role → that parent's recorded outputs
    out_uri: str  # the job's folder in the run
    run_id: str
    hub_name: str | None = None

    @property
    def threads(self) -> int:
        """Torch threads: the CPUs of the bundle it runs on."""
        return max(1, int(self.node.resources.get("CPU", 1)))
