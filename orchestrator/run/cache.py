"""The content-addressed stage cache: never pay twice for a job whose inputs did not change.

Every job gets a key, a hash of exactly what decides its output:

    tokenizer          its spec section, the pretraining data's fingerprint, the split
    data/<name>        the dataset's fingerprint, the tokenizer key, block length, split
    pretrain           its training section, the model section, tokenizer and data keys
    finetune/<domain>  the domain's options, the *pretrain key* (its parent), its data key
    scratch/<domain>   the domain's options, the model section, tokenizer and data keys
    evaluate/<domain>  the evaluate section and the keys of the models it scores

plus the code version (``code_version``: branchout's version, a hash of the code that
shapes outputs, and the versions of the numerical libraries). Settings that cannot change an output (log and checkpoint intervals,
retention, retries, resources other than the worker count) are left out.

A job that succeeds records ``<storage>/cache/stages/<key>.json`` (the job, the run, its
outputs). A later run finds the key, verifies the recorded outputs (manifests, SHA-256)
and marks the job ``cached`` instead of running it; a corrupted or deleted output is
simply computed again.
"""

from __future__ import annotations

import hashlib
import json
import time
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from branchout.core.spec import PipelineSpec, TrainingSpec
from branchout.stages import storage
from branchout.stages.checkpoint import CorruptCheckpointError, fetch_verified

if TYPE_CHECKING:
    from branchout.orchestrator.config.plan import Plan

# Fields of a training section that do not change what it produces.
OPERATIONAL = {"log_every", "checkpoint_every", "keep_checkpoints", "max_failures", "max_retries"}


# What decides an output besides the spec and the data: the code that runs on workers,
# the orchestrator modules that turn a spec into jobs (defaults, derived steps and batch
# arithmetic, job options, the evaluation rows), and the libraries doing the numerics.
OUTPUT_CODE = ("stages", "core/spec.py", "orchestrator/config/plan.py", "orchestrator/run/driver.py",
               "orchestrator/run/training.py", "cluster/memory.py")
OUTPUT_LIBRARIES = ("torch", "transformers", "deepspeed", "peft", "tokenizers", "datasets", "numpy",
                    "safetensors", "pyarrow")


@lru_cache(maxsize=1)
def code_version() -> str:
    """branchout's version, a hash of ``OUTPUT_CODE`` and the versions of ``OUTPUT_LIBRARIES``:
    an upgrade of any of them computes every job again instead of reusing old outputs."""
    from branchout import __version__

    root = Path(__file__).resolve().parents[2]  # the package root
    h = hashlib.sha256(__version__.encode())
    h.update(code_hash(root, OUTPUT_CODE).encode())
    for name, version in library_versions().items():
        h.update(f"{name}=={version}".encode())
    return f"{__version__}+{h.hexdigest()[:12]}"


def code_hash(root: Path, entries: tuple[str, ...]) -> str:
    """Paths and bytes of every ``.py`` file under ``entries`` (folders at any depth, so code
    moved into a subfolder keeps invalidating the cache)."""
    h = hashlib.sha256()
    for entry in entries:
        files = sorted((root / entry).rglob("*.py")) if (root / entry).is_dir() else [root / entry]
        for path in files:
            h.update(path.relative_to(root).as_posix().encode() + b"\0")
            h.update(path.read_bytes())
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in OUTPUT_LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "absent"
    return found


def model_fingerprint(path: str | None, revision: str | None) -> str | None:
    """Identity of an existing model's files (``model.path``): each file's name, size and
    modification time (a local folder or a storage URI), or the hub id and revision."""
    import os

    if path is None:
        return None
    if "://" not in path and not os.path.isdir(path):
        return f"hub:{path}@{revision or 'main'}"
    fs, root = storage.filesystem(path)
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    entries = sorted((i.path[len(root):], i.size, i.mtime_ns) for i in infos if i.type == pafs.FileType.File)
    return _h("model-files", entries)


def _h(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _training(t: TrainingSpec) -> dict:
    values = t.model_dump(mode="json", exclude=OPERATIONAL)
    resources = values.pop("resources_per_worker")
    values["uses_gpu"] = resources["gpu"] > 0  # where it runs changes numerics, how much does not
    return values


def data_fingerprints(spec: PipelineSpec) -> dict[str, str]:
    """Fingerprint of every dataset, by the name the stage cache uses (pretrain, domains)."""
    from branchout.stages.data import fingerprint

    fps = {"pretrain": fingerprint(spec.pretrain.dataset)}
    fps.update({d.name: fingerprint(d.dataset) for d in spec.finetune.domains})
    return fps


def job_keys(spec: PipelineSpec, fingerprints: dict[str, str], plan: Plan | None = None) -> dict[str, str]:
    """Keys of every job of ``spec``; ``fingerprints`` maps dataset name → data fingerprint.
    ``plan``: the run's plan (its pretrain steps are part of the pretrain's key), built from
    ``spec`` when not given."""
    from branchout.orchestrator.config.plan import build_plan

    ev = spec.evaluate
    split = (ev.heldout_fraction, ev.split_seed)
    model = {**spec.model.model_dump(mode="json"), "content": model_fingerprint(spec.model.path, spec.model.revision)}
    code = code_version()
    keys: dict[str, str] = {}
    keys["tokenizer"] = _h("tokenizer", code, spec.tokenizer.model_dump(mode="json"),
                           fingerprints["pretrain"], split)
    keys["data/pretrain"] = _h("data", code, fingerprints["pretrain"], keys["tokenizer"], spec.pretrain.seq_len, split)
    steps = (plan or build_plan(spec)).pretrain.steps
    keys["pretrain"] = _h("pretrain", code, _training(spec.pretrain), steps, model, keys["tokenizer"],
                          keys["data/pretrain"])
    for d in spec.finetune.domains:
        data_key = keys[f"data/{d.name}"] = _h("data", code, fingerprints[d.name], keys["tokenizer"],
                                                spec.domain_seq_len(d), split)
        options = {**_training(d), "seq_len": spec.domain_seq_len(d), "method": d.method, "lora": d.lora.model_dump()}
        keys[f"finetune/{d.name}"] = _h("finetune", code, options, keys["pretrain"], data_key)
        scratch = {**options, "method": "full"}
        keys[f"scratch/{d.name}"] = _h("scratch", code, scratch, model, keys["tokenizer"], data_key)
        producer = {"base": "pretrain", "finetuned": f"finetune/{d.name}", "scratch": f"scratch/{d.name}"}
        scored = {m: keys[producer[m]] for m in ev.models}
        keys[f"evaluate/{d.name}"] = _h("evaluate", code, ev.model_dump(mode="json"), scored, data_key)
    return keys


def dependents(spec: PipelineSpec, jobs: set[str]) -> set[str]:
    """``jobs`` and everything downstream of them."""
    out = set(jobs)
    names = [d.name for d in spec.finetune.domains]
    if "tokenizer" in out:
        out |= {"data/pretrain", *(f"data/{n}" for n in names)}
    if "data/pretrain" in out:
        out.add("pretrain")
    if "pretrain" in out:
        out |= {f"finetune/{n}" for n in names}
    for n in names:
        if f"data/{n}" in out:
            out |= {f"finetune/{n}", f"scratch/{n}"}
        if f"finetune/{n}" in out or f"scratch/{n}" in out or "pretrain" in out:
            out.add(f"evaluate/{n}")
    return out


def expand_rerun(spec: PipelineSpec, names: list[str]) -> set[str]:
    """``--rerun`` arguments (a job, a stage, or a domain) as job names, with dependents.

    Raises:
        ValueError: a name that is no job, stage or domain of this pipeline.
    """
    domains = [d.name for d in spec.finetune.domains]
    all_jobs = {"tokenizer", "data/pretrain", "pretrain",
                *(f"{k}/{n}" for k in ("data", "finetune", "scratch", "evaluate") for n in domains)}
    chosen: set[str] = set()
    for name in names:
        if name in all_jobs:
            chosen.add(name)
        elif name in domains:
            chosen |= {f"finetune/{name}", f"scratch/{name}", f"evaluate/{name}"}
        elif name in ("data", "finetune", "scratch", "evaluate"):
            chosen |= {j for j in all_jobs if j.startswith(f"{name}/")}
        else:
            raise ValueError(f"--rerun {name!r}: not a job, stage or domain of {spec.name} "
                             f"(stages: tokenizer, data, pretrain, finetune, scratch, evaluate; domains: {', '.join(domains)})")
    return dependents(spec, chosen)


class StageCache:
    """The index under ``<storage>/cache/stages``; ``skip`` holds jobs that must run anyway."""

    def __init__(self, storage_uri: str, enabled: bool = True, skip: set[str] | None = None):
        self.root = storage.join(storage_uri, "cache", "stages")
        self.enabled = enabled
        self.skip = skip or set()

    def lookup(self, job: str, key: str) -> dict | None:
        """The recorded outputs of ``key`` if they still verify, else None."""
        if not self.enabled or job in self.skip:
            return None
        uri = storage.join(self.root, f"{key}.json")
        if not storage.exists(uri):
            return None
        try:
            entry = json.loads(storage.read_text(uri))
        except (OSError, ValueError):
            return None
        for field in ("model_uri", "uri"):
            target = entry["outputs"].get(field)
            if target:
                try:
                    fetch_verified(target)
                except CorruptCheckpointError:
                    return None  # damaged or deleted: compute it again
        return {**entry["outputs"], "cached_from": entry["run_id"], "key": key}

    def store(self, job: str, key: str, run_id: str, outputs: dict) -> None:
        kept = {k: v for k, v in outputs.items() if k not in ("pid", "node", "cached_from")}
        entry = {"job": job, "key": key, "run_id": run_id, "time": time.time(), "outputs": kept}
        storage.write_text(storage.join(self.root, f"{key}.json"), json.dumps(entry, indent=1))
