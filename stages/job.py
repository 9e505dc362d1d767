"""The description of one training job, as the driver hands it to workers.

A job is plain data (picklable, JSON-able): what to train (``kind``, ``method``), on
which packed data, from which parent, for how many steps, and where to write. The same
object drives the Ray Train path (pretrain, multi-worker fine-tunes) and the
single-worker fan-out path, so both read it the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from branchout.stages import storage

JobKind = Literal["pretrain", "finetune", "scratch"]


@dataclass
class TrainJob:
    name: str  # "pretrain", "finetune/legal", "scratch/legal"
    kind: JobKind
    training: dict[str, Any]  # a TrainingSpec (PretrainSpec / DomainSpec) as a dict
    steps: int
    model_type: str
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

    def spec(self):
        """The training section, validated back into its pydantic model."""
        from branchout.orchestrator.spec import FinetuneOptions, PretrainSpec

        model = PretrainSpec if self.kind == "pretrain" else FinetuneOptions
        return model.model_validate(self.training)
