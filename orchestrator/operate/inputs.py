"""Ship what a submitted driver reads: local datasets and tokenizer/model directories.

A pipeline file names local paths; a submitted driver runs on the cluster, whose nodes do
not see the laptop's disk (and the laptop may be closed the moment ``submit`` returns).
Before submitting, every local input is made readable by the cluster and its path in the
spec is rewritten:

- **shared storage** (``s3://``, ``gs://``, a ``file://`` mount every node has): each input
  is published once under ``<storage>/inputs/sha256-<content hash>/`` with a manifest
  (readers verify it, like every checkpoint) and reused by later submits of the same
  content, so a 50 GB corpus is uploaded once, not per run;
- **a plain local storage path** (a single-node cluster): small inputs travel in the job's
  ``runtime_env`` working directory (Ray uploads it to every node that runs the job's
  workers); inputs larger than ``MAX_JOB_FILES_BYTES`` are refused with one line.

Hub datasets and inputs that already are URIs are left as they are.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

from branchout import storage
from branchout.core.spec import PipelineSpec
from branchout.storage.checkpoint import is_published, publish_dir

# Ray refuses a runtime_env package above 500 MiB; large inputs belong in shared storage.
MAX_JOB_FILES_BYTES = 100 * 1024**2
JOB_FILES = "branchout-inputs"  # the folder inside the job's working_dir


class ShippingError(RuntimeError):
    """An input cannot reach the cluster; the message says what to do instead."""


@dataclass
class Shipment:
    spec: PipelineSpec  # the spec with input paths rewritten to what the cluster reads
    working_dir: str | None = None  # a directory to ship as the job's runtime_env working_dir
    lines: list[str] = field(default_factory=list)  # what happened to each input, for the user


def ship_inputs(spec: PipelineSpec, user_working_dir: str | None = None) -> Shipment:
    """Make every local input of ``spec`` readable on the cluster; see the module docstring.

    Raises:
        ShippingError: inputs too large for the job's files while storage is a plain
            local path, or a ``--working-dir`` that leaves no room to ship them.
    """
    shipped = spec.model_copy(deep=True)
    inputs = list(_local_inputs(shipped))
    if not inputs:
        return Shipment(shipped)
    shared = not storage.is_local(spec.storage) or spec.storage.startswith("file://")
    if shared:
        lines = []
        for where, path, assign in inputs:
            uri, reused = _publish(path, spec.storage)
            # a file:// mount has the same path on every node: readers take it as a plain path
            assign(storage.local_path(uri) if spec.storage.startswith("file://") else uri)
            lines.append(f"{where}: {path} → {uri}{' (already uploaded)' if reused else ''}")
        return Shipment(shipped, lines=lines)
    return _in_job_files(shipped, inputs, user_working_dir)


def _local_inputs(spec: PipelineSpec) -> Iterator[tuple[str, str, object]]:
    """(field, local path, setter) of every input that is a path on this machine."""

    def dataset(where, ds):
        if ds.format != "hub" and storage.is_local(ds.path) and _exists(ds.path):
            yield where, ds.path, lambda uri, ds=ds: setattr(ds, "path", uri)

    p = spec.pretrain
    if p.dataset is not None:
        yield from dataset("pretrain.dataset.path", p.dataset)
    for i, source in enumerate(p.datasets or []):  # the spec's own models: the setter rewrites them
        yield from dataset(f"pretrain.datasets.{i}.path", source)
    for i, d in enumerate(spec.finetune.domains):
        yield from dataset(f"finetune.domains.{i}.dataset.path", d.dataset)
    harness = spec.evaluate.lm_eval
    if harness and harness.include_path and storage.is_local(harness.include_path) and os.path.isdir(harness.include_path):
        yield "evaluate.lm_eval.include_path", harness.include_path, lambda uri: setattr(harness, "include_path", uri)
    tok, model = spec.tokenizer, spec.model
    if tok.path and storage.is_local(tok.path) and os.path.isdir(tok.path):
        yield "tokenizer.path", tok.path, lambda uri: setattr(tok, "path", uri)
    if model.path and storage.is_local(model.path) and os.path.isdir(model.path):
        yield "model.path", model.path, lambda uri: setattr(model, "path", uri)


def _exists(path: str) -> bool:
    import glob

    return os.path.exists(path) or bool(glob.glob(path))


def _files(path: str) -> dict[str, str]:
    """Relative name → local file of an input: a file, a directory, or a glob."""
    from branchout.core.spec import DatasetSpec
    from branchout.stages.prepare.data import resolve_source

    if os.path.isdir(path) and not any(c in path for c in "*?["):
        root = path
        ignored = _gitignore(path)
        found = []
        for r, dirs, names in os.walk(path):
            dirs[:] = [d for d in dirs if d not in NEVER_SHIPPED_DIRS]  # .git, caches: not inputs, maybe secrets
            found += [os.path.join(r, n) for n in names
                      if shippable(os.path.relpath(os.path.join(r, n), path), ignored)]
    elif os.path.isfile(path):
        return {os.path.basename(path): path}
    else:  # a glob: the files it matches, relative to their common folder
        found = resolve_source(DatasetSpec(path=path)).files
        root = os.path.commonpath([os.path.dirname(f) for f in found])
    return {os.path.relpath(f, root): f for f in sorted(found) if os.path.basename(f) != "MANIFEST.json"}


# What a directory of inputs may hold that is not input, and may be a secret: never shipped.
NEVER_SHIPPED_DIRS = {".git", ".hg", ".svn", ".venv", "venv", "__pycache__", ".ipynb_checkpoints", ".cache",
                      ".aws", ".ssh", ".gnupg"}
NEVER_SHIPPED_FILES = (".env", ".env.*", "*.env", ".netrc", ".npmrc", ".pypirc", ".git-credentials", "*.pem",
                       "*.key", "id_rsa*", "id_ed25519*", "credentials", "credentials.json", ".DS_Store")


def _gitignore(root: str) -> list[str]:
    """The patterns of ``root/.gitignore`` (comments and negations dropped): what its owner
    keeps out of version control stays on this machine too."""
    try:
        with open(os.path.join(root, ".gitignore"), encoding="utf-8") as f:
            lines = [x.strip() for x in f]
    except OSError:
        return []
    return [x.rstrip("/") for x in lines if x and not x.startswith(("#", "!"))]


def shippable(rel: str, ignored: list[str] = ()) -> bool:
    """Whether the file ``rel`` (relative to its input directory) may travel to the cluster."""
    import fnmatch

    parts = rel.split(os.sep)
    name = parts[-1]
    if any(p in NEVER_SHIPPED_DIRS for p in parts[:-1]):
        return False
    if any(fnmatch.fnmatch(name, pattern) for pattern in NEVER_SHIPPED_FILES):
        return False
    for pattern in ignored:
        anchored = pattern.lstrip("/")
        if any(fnmatch.fnmatch(p, anchored) for p in parts) or fnmatch.fnmatch(rel, anchored):
            return False
    return True


def content_hash(files: dict[str, str]) -> str:
    """SHA-256 over (name, content) of every file: the input's identity wherever it lives."""
    h = hashlib.sha256()
    for name, local in sorted(files.items()):
        h.update(name.encode() + b"\0")
        with open(local, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def _publish(path: str, storage_uri: str) -> tuple[str, bool]:
    """Publish one input under ``<storage>/inputs/``; returns (the path to read it by, reused)."""
    files = _files(path)
    target = storage.join(storage_uri, "inputs", f"sha256-{content_hash(files)[:32]}")
    reused = is_published(target)
    if not reused:
        with tempfile.TemporaryDirectory(prefix="branchout-ship-") as staging:
            for name, local in files.items():  # links, not copies: publishing reads through them
                os.makedirs(os.path.dirname(os.path.join(staging, name)), exist_ok=True)
                os.symlink(os.path.abspath(local), os.path.join(staging, name))
            publish_dir(staging, target)
    single = os.path.isfile(path)
    return (storage.join(target, next(iter(files))) if single else target), reused


def _in_job_files(spec: PipelineSpec, inputs, user_working_dir: str | None) -> Shipment:
    if user_working_dir:
        raise ShippingError(
            f"{inputs[0][0]}: {inputs[0][1]} is on this machine, the cluster cannot read it, and "
            "--working-dir is taken; use storage the cluster shares (s3://…, gs://…, file:///mnt/…), "
            "which branchout uploads inputs to")
    total = sum(os.path.getsize(f) for _, path, _ in inputs for f in _files(path).values())
    if total > MAX_JOB_FILES_BYTES:
        raise ShippingError(
            f"{inputs[0][0]}: the local inputs hold {total / 1024**2:,.0f} MiB, more than a job's files "
            f"may ({MAX_JOB_FILES_BYTES // 1024**2} MiB) and storage is a local path the cluster cannot "
            "read; set storage to s3://…, gs://… or a shared file:///… mount and submit again "
            "(branchout uploads them there once)")
    work = tempfile.mkdtemp(prefix="branchout-job-")
    lines = []
    for where, path, assign in inputs:
        files = _files(path)
        folder = os.path.join(JOB_FILES, f"sha256-{content_hash(files)[:32]}")
        for name, local in files.items():
            os.makedirs(os.path.dirname(os.path.join(work, folder, name)), exist_ok=True)
            shutil.copyfile(local, os.path.join(work, folder, name))
        # relative: the driver and every worker of the job run inside the unpacked folder
        rel = os.path.join(folder, next(iter(files))) if os.path.isfile(path) else folder
        assign(rel)
        lines.append(f"{where}: {path} → the job's files ({rel})")
    return Shipment(spec, working_dir=work, lines=lines)
