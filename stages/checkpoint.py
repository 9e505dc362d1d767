"""Checkpoint and model-directory I/O: publish atomically, load only what verifies.

Publishing writes every file, fsyncs it, and writes ``MANIFEST.json`` (names, sizes,
SHA-256) last, the way torch.distributed.checkpoint writes ``.metadata`` last; on a
local filesystem the directory is additionally built under a temporary name and renamed
into place. A directory without a manifest is therefore unfinished by definition, and a
reader that verifies the manifest never loads a truncated or bit-flipped file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid

from branchout.stages import storage

MANIFEST = "MANIFEST.json"


class CorruptCheckpointError(RuntimeError):
    """A published directory fails verification; ``problems`` says which files."""

    def __init__(self, uri: str, problems: list[str]):
        self.uri = uri
        self.problems = problems
        super().__init__(f"{uri}: " + "; ".join(problems))


def build_manifest(local_dir: str) -> dict:
    files = {}
    for root, _, names in os.walk(local_dir):
        for name in sorted(names):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, local_dir)
            if rel == MANIFEST or name.startswith(".tmp-"):
                continue
            files[rel] = {"size": os.path.getsize(full), "sha256": _sha256_file(full)}
    return {"version": 1, "created": time.time(), "files": files}


def publish_dir(local_dir: str, uri: str, extra: dict | None = None) -> dict:
    """Publish ``local_dir`` at ``uri`` with a manifest written last; returns the manifest.

    An existing directory at ``uri`` is replaced.
    """
    manifest = build_manifest(local_dir)
    if extra:
        manifest["extra"] = extra
    payload = json.dumps(manifest, indent=1, sort_keys=True)
    if storage.is_local(uri):
        _publish_local(local_dir, storage.local_path(uri), payload)
    else:
        storage.remove_dir(uri)
        storage.upload_dir(local_dir, uri)
        storage.write_text(storage.join(uri, MANIFEST), payload)
    return manifest


def _publish_local(src: str, dst: str, manifest: str) -> None:
    parent = os.path.dirname(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".tmp-{os.path.basename(dst)}-{uuid.uuid4().hex[:8]}")
    shutil.copytree(src, staging)
    for root, _, names in os.walk(staging):
        for name in names:
            _fsync_path(os.path.join(root, name))
    with open(os.path.join(staging, MANIFEST), "w") as f:
        f.write(manifest)
        f.flush()
        os.fsync(f.fileno())
    if os.path.exists(dst):
        # rename() cannot replace a non-empty directory; move the old one aside first.
        old = f"{staging}.old"
        os.replace(dst, old)
        os.replace(staging, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, dst)
    _fsync_path(parent)


def read_manifest(uri: str) -> dict | None:
    manifest_uri = storage.join(uri, MANIFEST)
    if not storage.exists(manifest_uri):
        return None
    try:
        return json.loads(storage.read_text(manifest_uri))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {"files": None}


def verify_local(local_dir: str, manifest: dict | None) -> list[str]:
    """Problems of ``local_dir`` against its manifest; empty when it verifies."""
    if manifest is None:
        return [f"{MANIFEST} missing (never finished publishing)"]
    if not isinstance(manifest.get("files"), dict):
        return [f"{MANIFEST} unreadable"]
    problems = []
    for rel, meta in manifest["files"].items():
        full = os.path.join(local_dir, rel)
        if not os.path.isfile(full):
            problems.append(f"{rel}: missing")
        elif os.path.getsize(full) != meta["size"]:
            problems.append(f"{rel}: size {os.path.getsize(full)} != {meta['size']} (truncated?)")
        elif _sha256_file(full) != meta["sha256"]:
            problems.append(f"{rel}: SHA-256 mismatch (corrupted)")
    return problems


def fetch_verified(uri: str, local_dir: str | None = None) -> str:
    """A local, verified copy of the published directory at ``uri``.

    Raises:
        CorruptCheckpointError: naming the directory and every bad file.
    """
    if not storage.exists(uri):
        raise CorruptCheckpointError(uri, ["does not exist"])
    manifest = read_manifest(uri)
    path = storage.download_dir(uri, local_dir)
    problems = verify_local(path, manifest)
    if problems:
        raise CorruptCheckpointError(uri, problems)
    return path


def is_published(uri: str) -> bool:
    """Cheap check (manifest present) used to find finished outputs; loaders still verify."""
    return storage.exists(storage.join(uri, MANIFEST))


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
