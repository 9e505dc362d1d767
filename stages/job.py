"""The description of one training job, as the driver hands it to workers.

A job is plain data (picklable, JSON-able): what to train (``kind``, ``method``), on
which packed data, from which parent, for how many steps, and where to write. The same
object drives the Ray Train path (pretrain, multi-worker fine-tunes) and the
single-worker fan-out path, so both read it the same way.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from branchout.stages import storage

LEASE = "LEASE"


class LeaseLostError(RuntimeError):
    """Another attempt of the same job owns its directory; this worker must not write."""

JobKind = Literal["pretrain", "finetune", "scratch"]


@dataclass
class TrainJob:
    name: str  # "pretrain", "finetune/legal", "scratch/legal"
    kind: JobKind
    training: dict[str, Any]  # a TrainingSpec (PretrainSpec / DomainSpec) as a dict
    steps: int
    model_type: str | None  # None when the model comes from model_path
    model_overrides: dict[str, Any]
    tokenizer_uri: str
    data_uri: str
    out_uri: str  # the job's directory: model/, checkpoints/
    logs_uri: str  # the run's logs/ directory
    run_id: str
    hub_name: str | None = None
    method: Literal["full", "lora"] = "full"
    lora: dict[str, Any] | None = None
    base_model_uri: str | None = None  # the parent checkpoint of a fine-tune
    extra: dict[str, Any] = field(default_factory=dict)
    lease: str | None = None  # this attempt's token; see claim() / check_lease()
    tracking: dict[str, str] | None = None  # MLflow {"uri", "run_id"} this job logs its steps to
    model_path: str | None = None  # an existing model the pretrain continues (model.path)
    model_revision: str | None = None

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
        (``stages.engine.decide_precision``): everything after reads a concrete one."""
        import copy
        import dataclasses

        training = copy.deepcopy(self.training)
        training.setdefault("deepspeed", {})["precision"] = precision
        return dataclasses.replace(self, training=training)

    def spec(self):
        """The training section, validated back into its pydantic model."""
        from branchout.core.spec import FinetuneOptions, PretrainSpec

        model = PretrainSpec if self.kind == "pretrain" else FinetuneOptions
        return model.model_validate(self.training)

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
