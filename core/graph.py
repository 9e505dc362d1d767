"""The pipeline's jobs as one graph, built once from a validated spec.

Every job of a run is a ``Node``: its name (``finetune/legal``), its kind, its parents by
role, the spec section it carries (the pydantic model itself), the resources of one of
its workers and how many, and the settings that decide its output (its cache-key inputs).
Run creation, the driver's stages, cache keys and ``--rerun``, lineage, the plan,
autoscaling bundles, the display and the report read this graph; no other module spells
a job's name.

    tokenizer ─┬─ data/pretrain ─┬─ pretrain ───────── finetune/<d> ─┐
               │                 └─ data/<d> ─┬─────── finetune/<d>  ├─ evaluate/<d>
               └─────────────────────────────────────── scratch/<d> ─┘
                                 (evaluate.cross: cross/<d> and cross/base score the same
                                  models on every other held-out set and the general one;
                                  evaluate.lm_eval: lm_eval/<d> and lm_eval/base run the
                                  harness's tasks on the fine-tunes and the base)

A data job of a domain has the pretraining data as a parent: its held-out split is
decontaminated against that corpus's training text. Nodes are in the order the run
record lists them; ``of(kind, ...)`` returns them in the order its kinds are given.

A node with an ``entry`` (``"module:function"``) is run by the driver from the node alone:
once every parent is done, ``function(NodeJob)`` (``stages.job.NodeJob``: the node, the
spec, each parent's recorded outputs by role) runs as a Ray task on the node's bundle, and
the dict it returns is the job's outputs. A new kind of job is a ``Kind``, its nodes here
and that function (docs/architecture.md, "Adding a job kind"); the kinds without an entry
are the driver's own stages.

Nothing here touches Ray, storage or the data (``core`` imports no other layer).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict

from branchout.core.spec import DatasetSpec, PipelineSpec, PretrainSpec, TrainingSpec


class Kind(StrEnum):
    TOKENIZER = "tokenizer"
    DATA = "data"
    PRETRAIN = "pretrain"
    FINETUNE = "finetune"
    SCRATCH = "scratch"
    EVALUATE = "evaluate"
    CROSS = "cross"  # evaluate.cross: models scored on other domains' and the general held-out text
    LM_EVAL = "lm_eval"  # evaluate.lm_eval: lm-evaluation-harness tasks on the base and each fine-tune

    @property
    def stage(self) -> str:
        """The driver stage that runs this kind: fine-tunes and baselines are the fan-out."""
        return "fanout" if self in (Kind.FINETUNE, Kind.SCRATCH) else self.value


KINDS = tuple(k.value for k in Kind)

# Fields of a training section that do not change what it produces.
OPERATIONAL = {"log_every", "checkpoint_every", "keep_checkpoints", "max_failures", "max_retries",
               "farm",  # a farm member trains as it would alone (stages.training.farm)
               # scoring held-out text only watches the training, unless it picks the model (selection_settings)
               "eval_every", "eval_blocks", "keep_best", "early_stop"}

FARM_MAX = 16  # members of one farm at most; more farmable domains make more farms

@dataclass(frozen=True)
class Node:
    """One job: what it is, what it needs and what decides its output."""

    name: str  # the record's key and the job's folder in the run: "finetune/legal"
    kind: Kind
    parents: dict[str, str] = field(default_factory=dict)  # role → job name, in lineage order
    domain: str | None = None  # domain jobs; a data job: the dataset's name ("pretrain" or a domain)
    section: Any = None  # the spec model it carries (DomainSpec with its seq_len, PretrainSpec, ...)
    seq_len: int | None = None  # the block length it packs (data) or trains at
    workers: int = 1
    resources: dict[str, float] = field(default_factory=dict)  # one worker's Ray bundle
    key_inputs: Any = None  # settings (JSON-able) that decide its output, besides the parents'
    reads: str | None = None  # the dataset whose fingerprint decides its output
    model_files: bool = False  # whether `model.path`'s files decide its output
    entry: str | None = None  # "module:function" the driver runs it with (see the module's docstring)
    farm: str | None = None  # fine-tunes: the adapter farm it trains in ("farm-1"), or None: alone
    mixture: tuple[str, ...] = ()  # the tokenizer of a mixture: the datasets whose fingerprints decide it

    @property
    def path(self) -> tuple[str, ...]:
        """Its folder under the run: ``("finetune", "legal")``."""
        return tuple(self.name.split("/"))

    @property
    def bundles(self) -> list[dict[str, float]]:
        """What it holds while it runs: one bundle per worker."""
        return [self.resources] * self.workers

    @property
    def lineage_parent(self) -> str | None:
        """The parent it is drawn under: its first parent that is not a data job."""
        return next((p for p in self.parents.values() if not p.startswith(Kind.DATA.value + "/")), None)


class JobGraph:
    """The nodes of one pipeline, in record order."""

    def __init__(self, spec: PipelineSpec, nodes: list[Node], pretrain_steps: int):
        self.spec = spec
        self.pretrain_steps = pretrain_steps
        self.nodes: dict[str, Node] = {}
        self._children: dict[str, list[str]] = {}
        for n in nodes:  # parents first: the order every walk (cache keys, the record) relies on
            missing = [p for p in n.parents.values() if p not in self.nodes]
            if missing or n.name in self.nodes:
                raise ValueError(f"job graph: {n.name} listed twice or before its parents {missing}")
            self.nodes[n.name] = n
            self._children[n.name] = []
            for parent in n.parents.values():
                self._children[parent].append(n.name)

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes.values())

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    def __contains__(self, name: object) -> bool:
        return name in self.nodes

    @property
    def names(self) -> list[str]:
        return list(self.nodes)

    @property
    def domains(self) -> list[str]:
        return [d.name for d in self.spec.finetune.domains]

    def of(self, *kinds: Kind) -> list[Node]:
        """Nodes of these kinds, kind by kind in the order given."""
        return [n for kind in kinds for n in self.nodes.values() if n.kind is kind]

    def descendants(self, names: set[str]) -> set[str]:
        """``names`` and everything downstream of them."""
        out, todo = set(names), list(names)
        while todo:
            for child in self._children[todo.pop()]:
                if child not in out:
                    out.add(child)
                    todo.append(child)
        return out

    def ancestors(self, name: str) -> set[str]:
        out, todo = set(), [name]
        while todo:
            for parent in self.nodes[todo.pop()].parents.values():
                if parent not in out:
                    out.add(parent)
                    todo.append(parent)
        return out

    def select(self, names: list[str]) -> set[str]:
        """``--rerun`` arguments (a job, a kind of job, or a domain) as job names, with
        everything downstream of them.

        Raises:
            ValueError: a name that is no job, stage or domain of this pipeline.
        """
        chosen: set[str] = set()
        for name in names:
            if name in self.nodes:
                chosen.add(name)
            elif name in self.domains:  # the domain's training and scoring, not its data
                chosen |= {n.name for n in self.nodes.values() if n.domain == name and n.kind is not Kind.DATA}
            elif name in KINDS:
                chosen |= {n.name for n in self.of(Kind(name))}
            else:
                raise ValueError(f"--rerun {name!r}: not a job, stage or domain of {self.spec.name} "
                                 f"(stages: {', '.join(KINDS)}; domains: {', '.join(self.domains)})")
        return self.descendants(chosen)


class Corpus(BaseModel):
    """A pretraining corpus as the jobs see it: one for ``pretrain.dataset``, one per source
    of ``pretrain.datasets``."""

    model_config = ConfigDict(frozen=True)

    key: str  # "pretrain", or "pretrain/<source>": its data job is "data/<key>"
    where: str  # the spec field, for messages: "pretrain.dataset", "pretrain.datasets.1"
    dataset: DatasetSpec
    weight: float  # normalised share of the training blocks

    @property
    def heldout_set(self) -> str:
        """Its held-out set's name in cross scores: "general", or "general/<source>"."""
        return "general" + self.key.removeprefix("pretrain")


def corpora(p: PretrainSpec) -> list[Corpus]:
    """The pretraining corpora with their normalised weights, in the file's order."""
    if p.datasets is None:
        return [Corpus(key="pretrain", where="pretrain.dataset", dataset=p.dataset, weight=1.0)]
    total = sum(s.weight for s in p.datasets)
    return [Corpus(key=f"pretrain/{s.name}", where=f"pretrain.datasets.{i}",
                   dataset=DatasetSpec(**s.model_dump(exclude={"name", "weight"}, exclude_unset=True)),
                   weight=s.weight / total) for i, s in enumerate(p.datasets)]


def pretrain_steps(spec: PipelineSpec) -> int:
    """The pretrain's optimizer steps: given, or derived from its token budget."""
    p = spec.pretrain
    return p.steps if p.steps is not None else math.ceil(p.tokens / (p.global_batch_size * p.seq_len))


def output_settings(t: TrainingSpec) -> dict:
    """A training section's settings that decide what it produces (not intervals, retries or
    how much of a resource: only whether it trains on a GPU, which changes numerics)."""
    values = t.model_dump(mode="json", exclude=OPERATIONAL)
    resources = values.pop("resources_per_worker")
    values["uses_gpu"] = resources["gpu"] > 0
    return values


def selection_settings(t: TrainingSpec) -> dict | None:
    """The held-out scoring settings of a fine-tune whose scores pick its model (``keep_best``,
    ``early_stop``): they decide its output. None where scoring only watches."""
    if t.eval_every is None or not (getattr(t, "keep_best", False) or getattr(t, "early_stop", None)):
        return None
    return t.model_dump(mode="json", include={"eval_every", "eval_blocks", "keep_best", "early_stop"})


def farm_blockers(d: TrainingSpec) -> list[str]:
    """Why a domain cannot train in an adapter farm (empty: it can)."""
    why = []
    if getattr(d, "method", "full") != "lora":
        why.append("method is not lora")
    elif d.lora.dropout:
        why.append("LoRA dropout is not 0 (its masks would come from a stream the members share)")
    if d.uses_deepspeed():
        why.append("it trains with DeepSpeed (several workers or offload)")
    if d.activation_checkpointing:
        why.append("activation_checkpointing is on")
    if d.eval_every is not None:
        why.append("eval_every is set (a farm member is not scored during training yet)")
    if getattr(d, "replay", 0):
        why.append("replay is set (a farm member reads its domain's blocks only)")
    if d.deepspeed.precision == "fp16":
        why.append("precision is fp16 (its loss scaler would be shared)")
    return why


def farm_groups(spec: PipelineSpec) -> dict[str, str]:
    """Domain → the adapter farm it trains in. Domains that can farm (``farm_blockers``) and
    share the block length, precision, bundle and LoRA targets form a group; ``auto`` farms
    a group of two or more, ``true`` even one alone; a group larger than a farm holds is
    split in order: ``FARM_MAX``, or fewer where the memory planner says one GPU holds fewer
    (``spec.farm_capacity``, set by the loader for GPUs of a known type)."""
    groups: dict[tuple, list] = {}
    for d in spec.finetune.domains:
        if d.farm is False or farm_blockers(d):
            continue
        key = (spec.domain_seq_len(d), d.deepspeed.precision, tuple(sorted(d.resources_per_worker.ray_bundle().items())),
               tuple(d.lora.target_modules or ()))
        groups.setdefault(key, []).append(d)
    out: dict[str, str] = {}
    for members in groups.values():
        size = max(1, min([FARM_MAX, *(spec.farm_capacity.get(d.name, FARM_MAX) for d in members)]))
        if (len(members) < 2 or size < 2) and members[0].farm is not True:
            continue
        for i in range(0, len(members), size):
            name = f"farm-{len(set(out.values())) + 1}"
            out.update({d.name: name for d in members[i:i + size]})
    return out


def scoring_settings(spec: PipelineSpec) -> dict:
    """The evaluate section's settings that decide a score (not which jobs exist, nor how the
    report reads the scores)."""
    return spec.evaluate.model_dump(mode="json", exclude={"cross", "forgetting", "lm_eval"})


def build_graph(spec: PipelineSpec) -> JobGraph:
    """Every job of ``spec``, its parents, resources and cache-key inputs."""
    ev = spec.evaluate
    split = (ev.heldout_fraction, ev.split_seed)
    model = spec.model.model_dump(mode="json")
    p = spec.pretrain
    steps = pretrain_steps(spec)
    sources = corpora(p)
    # a mixture's tokenizer reads an equal share of every source: weights do not enter
    nodes = [
        Node("tokenizer", Kind.TOKENIZER, section=spec.tokenizer, resources={"CPU": 1},
             key_inputs=[spec.tokenizer.model_dump(mode="json"), split],
             reads=sources[0].key if len(sources) == 1 else None,
             mixture=tuple(c.key for c in sources) if p.datasets else ()),
    ]
    # 0 CPUs: a data job only drives a Ray Data pipeline whose tasks take the CPUs;
    # holding one would starve its own tasks on a small cluster
    nodes += [Node(f"data/{c.key}", Kind.DATA, {"tokenizer": "tokenizer"}, domain=c.key, section=c.dataset,
                   seq_len=p.seq_len, resources={"CPU": 0}, key_inputs=[p.seq_len, split], reads=c.key)
              for c in sources]
    # a domain's held-out text is decontaminated against every pretraining corpus
    references = {("reference" if len(sources) == 1 else f"reference:{c.key}"): f"data/{c.key}" for c in sources}
    for d in spec.finetune.domains:
        nodes.append(Node(f"data/{d.name}", Kind.DATA, {"tokenizer": "tokenizer", **references},
                          domain=d.name, section=d.dataset, seq_len=spec.domain_seq_len(d), resources={"CPU": 0},
                          key_inputs=[spec.domain_seq_len(d), split], reads=d.name))
    copy = steps == 0  # branch straight from model.path: the pretrain is a one-CPU copy of it
    # the mixture's weights decide what the pretrain reads (not what the data jobs make)
    data = {"data": "data/pretrain"} if not p.datasets else {f"data:{c.key}": f"data/{c.key}" for c in sources}
    # pretrain.stop: where it stops depends on the probes, so on every domain's data
    if p.probes is not None and p.stop is not None:
        data.update({f"probe:{d.name}": f"data/{d.name}" for d in spec.finetune.domains})
    nodes.append(Node("pretrain", Kind.PRETRAIN, {"tokenizer": "tokenizer", **data},
                      section=p, seq_len=p.seq_len, workers=1 if copy else p.num_workers,
                      resources={"CPU": 1} if copy else p.resources_per_worker.ray_bundle(),
                      key_inputs=[output_settings(p), steps, model], model_files=True))
    farms = farm_groups(spec)
    for d in spec.finetune.domains:
        training = d.model_copy(update={"seq_len": spec.domain_seq_len(d)})  # its options, block length decided
        options = {**output_settings(d), "seq_len": training.seq_len, "method": d.method, "lora": d.lora.model_dump(),
                   "selection": selection_settings(d)}
        bundle = d.resources_per_worker.ray_bundle()
        # replay: the pretraining corpora's blocks mixed into the domain's (weights: the pretrain's)
        replayed = {f"replay:{c.key}": f"data/{c.key}" for c in sources} if d.replay else {}
        nodes.append(Node(f"finetune/{d.name}", Kind.FINETUNE, {"base": "pretrain", "data": f"data/{d.name}", **replayed},
                          domain=d.name, section=training, seq_len=training.seq_len, workers=d.num_workers,
                          resources=bundle, key_inputs=options, farm=farms.get(d.name)))
        if "scratch" in ev.models:
            # the baseline trains every weight from scratch whatever the domain's method
            nodes.append(Node(f"scratch/{d.name}", Kind.SCRATCH, {"tokenizer": "tokenizer", "data": f"data/{d.name}"},
                              domain=d.name, section=training.model_copy(update={"method": "full", "replay": 0.0}),
                              seq_len=training.seq_len, workers=d.num_workers, resources=bundle,
                              key_inputs=[{**options, "method": "full", "replay": 0.0}, model], model_files=True))
    for d in spec.finetune.domains:
        # scored on one worker of the domain's fine-tune bundle (GPU share, accelerator type)
        producer = {"finetuned": f"finetune/{d.name}", "scratch": f"scratch/{d.name}", "base": "pretrain"}
        scored = {m: job for m, job in producer.items() if m in ev.models}
        nodes.append(Node(f"evaluate/{d.name}", Kind.EVALUATE, {**scored, "data": f"data/{d.name}"},
                          domain=d.name, section=ev, resources=d.resources_per_worker.ray_bundle(),
                          key_inputs=[scoring_settings(spec)]))
    if ev.cross:
        nodes += cross_nodes(spec)
    if ev.lm_eval:
        nodes += lm_eval_nodes(spec)
    return JobGraph(spec, nodes, steps)


def lm_eval_nodes(spec: PipelineSpec) -> list[Node]:
    """``evaluate.lm_eval``: the harness's tasks on the base (``lm_eval/base``, on a pretrain
    worker's bundle) and on each domain's fine-tune (``lm_eval/<d>``, on its bundle: a LoRA
    adapter is merged into its base first)."""
    settings = spec.evaluate.lm_eval.model_dump(mode="json")
    p = spec.pretrain
    models = spec.evaluate.models
    out = [Node("lm_eval/base", Kind.LM_EVAL, {"base": "pretrain"}, section=p,
                resources=p.resources_per_worker.ray_bundle(), entry=LM_EVAL_ENTRY,
                key_inputs=[settings, p.deepspeed.precision, p.resources_per_worker.uses_gpu])] if "base" in models else []
    for d in spec.finetune.domains if "finetuned" in models else []:
        out.append(Node(f"lm_eval/{d.name}", Kind.LM_EVAL, {"finetuned": f"finetune/{d.name}", "base": "pretrain"},
                        domain=d.name, section=d, resources=d.resources_per_worker.ray_bundle(), entry=LM_EVAL_ENTRY,
                        key_inputs=[settings, d.method, d.deepspeed.precision, d.resources_per_worker.uses_gpu]))
    return out


LM_EVAL_ENTRY = "branchout.stages.evaluation.lm_eval:run_harness"


def cross_nodes(spec: PipelineSpec) -> list[Node]:
    """``evaluate.cross``: each domain's fine-tuned and scratch models scored on every other
    domain's held-out text and on the general (pretraining corpus's) held-out text; the base
    on the general text (its own domain's scores are the evaluation's). Parents ``heldout:<set>``
    are the data jobs whose held-out blocks it scores."""
    ev = spec.evaluate
    scoring = [scoring_settings(spec)]
    # the general held-out text: the corpus's, or each source's of a mixture ("general/<source>")
    general = {f"heldout:{c.heldout_set}": f"data/{c.key}" for c in corpora(spec.pretrain)}
    out = []
    if "base" in ev.models:
        p = spec.pretrain
        out.append(Node("cross/base", Kind.CROSS, {"base": "pretrain", **general}, section=p,
                        resources=p.resources_per_worker.ray_bundle(), entry=CROSS_ENTRY,
                        key_inputs=[*scoring, p.deepspeed.precision, p.resources_per_worker.uses_gpu]))
    for d in spec.finetune.domains:
        models = {role: f"{kind}/{d.name}" for role, kind in (("finetuned", "finetune"), ("scratch", "scratch"))
                  if role in ev.models}
        if not models:
            continue
        others = {f"heldout:{o.name}": f"data/{o.name}" for o in spec.finetune.domains if o.name != d.name}
        # the base: a LoRA fine-tune's adapter is scored on it
        out.append(Node(f"cross/{d.name}", Kind.CROSS, {**models, "base": "pretrain", **general, **others},
                        domain=d.name, section=d, resources=d.resources_per_worker.ray_bundle(), entry=CROSS_ENTRY,
                        key_inputs=[*scoring, d.method, d.deepspeed.precision, d.resources_per_worker.uses_gpu]))
    return out


CROSS_ENTRY = "branchout.stages.evaluation.cross:score_elsewhere"
