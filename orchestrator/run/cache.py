"""The content-addressed stage cache: never pay twice for a job whose inputs did not change.

Every job gets a key, a hash of exactly what decides its output:

    tokenizer          its spec section, the pretraining data's fingerprint, the split
    data/<name>        the dataset's fingerprint, the tokenizer key, block length, split
                       (a domain's: also the pretraining data's key, its decontamination reference)
    pretrain           its training section, the model section, tokenizer and data keys
    finetune/<domain>  the domain's options, the *pretrain key* (its parent), its data key
    scratch/<domain>   the domain's options, the model section, tokenizer and data keys
    evaluate/<domain>  the evaluate section and the keys of the models it scores

plus the code version (``code_version``: branchout's version, a hash of the code that
shapes outputs, and the versions of the numerical libraries). Settings that cannot change
an output (log and checkpoint intervals, retention, retries, resources other than the
worker count) are left out. ``core.graph`` states each job's inputs and parents;
``job_keys`` hashes them.

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
from typing import Any

from branchout import storage
from branchout.core.graph import JobGraph, Kind
from branchout.storage.checkpoint import CorruptCheckpointError, fetch_verified

# What decides an output besides the spec and the data: the code that runs on workers,
# the orchestrator modules that turn a spec into jobs (defaults, derived steps and batch
# arithmetic, job options, the evaluation rows), and the libraries doing the numerics.
OUTPUT_CODE = ("stages", "storage", "core/spec.py", "core/graph.py", "orchestrator/config/plan.py", "orchestrator/run/driver.py",
               "orchestrator/run/ray_train.py", "cluster/gpu_memory.py")
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


def data_fingerprints(graph: JobGraph) -> dict[str, str]:
    """Fingerprint of every dataset, by its data job's ``domain`` (pretrain, domains)."""
    from branchout.stages.prepare.data import fingerprint

    return {n.domain: fingerprint(n.section) for n in graph.of(Kind.DATA)}


def job_keys(graph: JobGraph, fingerprints: dict[str, str]) -> dict[str, str]:
    """Keys of every job of ``graph``, parents first; ``fingerprints`` maps dataset name → data
    fingerprint. A key hashes the job's kind, the code version, the settings that decide its
    output (``Node.key_inputs``), its parents' keys by role, the fingerprint of the dataset it
    reads and, where the model section's files shape it, their fingerprint."""
    model = graph.spec.model
    content = model_fingerprint(model.path, model.revision) if any(n.model_files for n in graph) else None
    code = code_version()
    keys: dict[str, str] = {}
    for node in graph:
        parts = [node.kind.value, code, node.key_inputs, {role: keys[p] for role, p in node.parents.items()}]
        if node.reads:
            parts.append(fingerprints[node.reads])
        parts += [fingerprints[name] for name in node.mixture]
        if node.model_files:
            parts.append(content)
        keys[node.name] = _h(*parts)
    return keys


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
