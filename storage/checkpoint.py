"""Checkpoint and model-directory I/O: publish atomically, load only what verifies.

Publishing writes every file, fsyncs it, and writes ``MANIFEST.json`` (names, sizes,
SHA-256) last, the way torch.distributed.checkpoint writes ``.metadata`` last; on a
local filesystem the directory is additionally built under a temporary name and renamed
into place. A directory without a manifest is therefore unfinished by definition, and a
reader that verifies the manifest never loads a truncated or bit-flipped file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable

from branchout import storage
from branchout.storage.retry import retrying

MANIFEST = "MANIFEST.json"


class CorruptCheckpointError(RuntimeError):
    """A published directory fails verification; ``problems`` says which files."""

    def __init__(self, uri: str, problems: list[str]):
        self.uri = uri
        self.problems = problems
        super().__init__(f"{uri}: " + "; ".join(problems))


def build_manifest(local_dir: str) -> dict:
    paths = {}
    for root, _, names in os.walk(local_dir):
        for name in sorted(names):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, local_dir)
            if rel != MANIFEST and not name.startswith(".tmp-"):
                paths[rel] = full
    digests = _hash_all(list(paths.values()))
    files = {rel: {"size": os.path.getsize(full), "sha256": digests[full]} for rel, full in sorted(paths.items())}
    return {"version": 1, "created": time.time(), "files": files}


def _hash_all(paths: list[str]) -> dict[str, str]:
    """SHA-256 of many files at once: hashlib releases the GIL, so shards hash in parallel."""
    from concurrent.futures import ThreadPoolExecutor

    if len(paths) <= 1:
        return {p: _sha256_file(p) for p in paths}
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1, len(paths))) as pool:
        return dict(zip(paths, pool.map(_sha256_file, paths), strict=True))


def publish_dir(local_dir: str, uri: str, extra: dict | None = None) -> dict:
    """Publish ``local_dir`` at ``uri`` with a manifest written last; returns the manifest.

    An existing directory at ``uri`` is replaced, and never before the new copy is complete
    and verified: locally by renames; on object stores (no rename) see ``_publish_remote``.
    """
    manifest = build_manifest(local_dir)
    if extra:
        manifest["extra"] = extra
    payload = json.dumps(manifest, indent=1, sort_keys=True)
    if storage.is_local(uri):  # a fresh staging copy each try: a retried publish is a whole one
        retrying(f"publish {uri}", _publish_local, local_dir, storage.local_path(uri), payload)
    else:
        _publish_remote(local_dir, uri, manifest, payload)
    return manifest


def _publish_remote(local_dir: str, uri: str, manifest: dict, payload: str) -> None:
    """Object stores: upload the new copy beside the old one (``<uri>.staging-<id>``), then
    ``_replace_remote``. An upload that fails (worker killed, network gone) leaves the old
    copy untouched."""
    staging = _remote_staging(uri)
    try:
        storage.upload_dir(local_dir, staging)
        _replace_remote(staging, uri, manifest, payload)
    finally:
        storage.remove_dir(staging)


def _remote_staging(uri: str) -> str:
    return f"{uri.rstrip('/')}.staging-{uuid.uuid4().hex[:8]}"


def _replace_remote(staging: str, uri: str, manifest: dict, payload: str) -> None:
    """Check that every file of ``staging`` arrived whole, and only then replace the old copy
    at ``uri`` by a server-side copy with the manifest last: from the moment the old copy is
    deleted a verified new one exists."""
    storage.write_text(storage.join(staging, MANIFEST), payload)
    problems = _remote_size_problems(staging, manifest)
    if problems:
        raise CorruptCheckpointError(staging, [f"upload incomplete: {p}" for p in problems])
    if storage.exists(uri):
        storage.remove_file(storage.join(uri, MANIFEST))  # the old copy stops verifying first
        storage.remove_dir(uri)
    storage.copy_dir(staging, uri, last=MANIFEST)


def _remote_size_problems(uri: str, manifest: dict) -> list[str]:
    sizes = storage.sizes(uri)
    return [f"{name}: {sizes.get(name)} bytes of {meta['size']}" for name, meta in manifest["files"].items()
            if sizes.get(name) != meta["size"]]


def _publish_local(src: str, dst: str, manifest: str) -> None:
    staging = _local_staging(dst)
    try:
        shutil.copytree(src, staging)
        for root, _, names in os.walk(staging):
            for name in names:
                _fsync_path(os.path.join(root, name))
        _replace_local(staging, dst, manifest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a failed publish leaves nothing beside dst
        raise


STALE_STAGING_S = 3600  # a staging copy this old belongs to a writer that died (writes take seconds to minutes)


def _local_staging(dst: str) -> str:
    """A fresh name beside ``dst`` (same filesystem, so it can be renamed into place). Staging
    copies of ``dst`` an hour old or more, left by writers that were killed, are swept first."""
    parent = os.path.dirname(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    prefix = f".tmp-{os.path.basename(dst)}-"
    now = time.time()
    for name in os.listdir(parent):
        path = os.path.join(parent, name)
        with contextlib.suppress(OSError):
            if name.startswith(prefix) and now - os.path.getmtime(path) >= STALE_STAGING_S:
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return os.path.join(parent, f"{prefix}{uuid.uuid4().hex[:8]}")


def _replace_local(staging: str, dst: str, manifest: str) -> None:
    """Write the manifest into ``staging`` (its files already fsynced), then rename it to
    ``dst``, replacing an old copy only now."""
    parent = os.path.dirname(os.path.abspath(dst))
    with open(os.path.join(staging, MANIFEST), "w") as f:
        f.write(manifest)
        f.flush()
        os.fsync(f.fileno())
    if os.path.exists(dst):
        if exchange(staging, dst):  # one atomic step: a reader sees the old copy or the new one
            shutil.rmtree(staging, ignore_errors=True)  # now the old copy
        else:
            # rename() cannot replace a non-empty directory; move the old one aside first (a
            # crash between the two renames leaves both copies beside dst, none at it)
            old = f"{staging}.old"
            os.replace(dst, old)
            os.replace(staging, dst)
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, dst)
    _fsync_path(parent)


def exchange(a: str, b: str) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where
    the system or the filesystem cannot, and nothing was changed."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:  # glibc before 2.28
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


class Publisher:
    """Publishes a directory whose files are finished one at a time (the data stage's shards).

    ``add`` hands each finished file over at once to a staging copy beside ``uri``: a
    rename when ``uri`` is on the same local filesystem, an upload to ``<uri>.staging-<id>``
    on object stores. So the writer's local disk holds the files being written and at most
    ``pending`` finished ones, never the whole directory (a 1 TB corpus packs on a node with
    little scratch space), and nothing is copied twice. ``commit`` then publishes exactly as
    ``publish_dir`` does: manifest last, an old copy replaced only by a complete new one.
    Leaving the ``with`` block without ``commit`` (an error, a killed job) removes the
    staging copy and leaves an old copy as it was.
    """

    def __init__(self, uri: str, pending: int = 2):
        from concurrent.futures import ThreadPoolExecutor

        self.uri, self.local, self.pending = uri, storage.is_local(uri), pending
        self.staging = _local_staging(storage.local_path(uri)) if self.local else _remote_staging(uri)
        if self.local:
            os.makedirs(self.staging)
        self.files: dict[str, dict] = {}
        # one thread: hashing, fsync and uploads overlap the writer, not each other
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="publish")
        self._inflight: list = []
        self._committed = False

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        if not self._committed:
            storage.remove_dir(self.staging)

    def add(self, path: str, name: str | None = None) -> None:
        """Hand over the finished local file ``path`` (moved: it is gone afterwards) as ``name``.

        Raises:
            OSError: an earlier file could not be handed over.
        """
        self._inflight.append(self._pool.submit(self._transfer, path, name or os.path.basename(path)))
        while len(self._inflight) > self.pending:  # bound the finished files still on local disk
            self._inflight.pop(0).result()

    def _transfer(self, path: str, name: str) -> None:
        entry = {"size": os.path.getsize(path), "sha256": storage.sha256_file(path)}
        target = storage.join(self.staging, name)
        if not (self.local and _renamed(path, target)):
            storage.upload_file(path, target)  # an object store, or another local filesystem
            os.remove(path)
        if self.local:
            _fsync_path(target)
        self.files[name] = entry

    def commit(self, extra: dict | None = None) -> dict:
        """Publish at ``uri`` every file added; returns the manifest."""
        for future in self._inflight:
            future.result()
        self._inflight = []
        manifest = {"version": 1, "created": time.time(), "files": dict(sorted(self.files.items()))}
        if extra:
            manifest["extra"] = extra
        payload = json.dumps(manifest, indent=1, sort_keys=True)
        if self.local:
            _replace_local(self.staging, storage.local_path(self.uri), payload)
        else:
            _replace_remote(self.staging, self.uri, manifest, payload)
            storage.remove_dir(self.staging)
        self._committed = True
        return manifest


def _renamed(src: str, dst: str) -> bool:
    """Rename ``src`` to ``dst``; False when they are on different filesystems."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    try:
        os.replace(src, dst)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        return False
    return True


def read_manifest(uri: str, name: str = MANIFEST) -> dict | None:
    """The manifest ``name`` of the directory at ``uri``; None when there is none. One that
    does not parse or fails ``manifest_problems`` comes back as ``{"files": None, "invalid":
    [why]}``: nothing it lists is read or written."""
    manifest_uri = storage.join(uri, name)
    if not storage.exists(manifest_uri):
        return None
    try:
        manifest = json.loads(storage.read_text(manifest_uri))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {"files": None, "invalid": [f"{name}: not JSON"]}
    problems = manifest_problems(manifest)
    return {"files": None, "invalid": [f"{name}: {p}" for p in problems]} if problems else manifest


_SHA256 = re.compile(r"[0-9a-f]{64}")


def manifest_problems(manifest) -> list[str]:
    """Why a manifest read from storage must not be trusted; empty when it may be.

    Whoever can write to the bucket can write a manifest, and its member names become local
    paths (downloads, verification) and its hashes file names (the block cache): a member is
    a relative path inside its directory (no absolute path, no ``..``, no backslash or NUL),
    its size a non-negative integer, its hash 64 lowercase hex digits.
    """
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return ["no file list"]
    problems = []
    for rel, meta in manifest["files"].items():
        parts = rel.split("/") if isinstance(rel, str) else []
        if (not parts or rel.startswith("/") or any(p in ("", ".", "..") for p in parts)
                or "\\" in rel or "\x00" in rel or os.path.isabs(rel)):
            problems.append(f"member {rel!r} is not a path inside the directory")
        elif not isinstance(meta, dict) or not isinstance(meta.get("size"), int) or meta["size"] < 0 \
                or isinstance(meta["size"], bool):
            problems.append(f"member {rel!r} has no valid size")
        elif not isinstance(meta.get("sha256"), str) or not _SHA256.fullmatch(meta["sha256"]):
            problems.append(f"member {rel!r} has no valid SHA-256")
    return problems


def rank_manifest_name(rank: int) -> str:
    return f"MANIFEST.rank{rank}.json"


def write_rank_manifest(local_dir: str, rank: int, world: int, extra: dict | None = None) -> None:
    """Each rank of a sharded checkpoint lists its own files; the set is complete when all
    ``world`` rank manifests are present (each written after that rank's shards)."""
    manifest = build_manifest(local_dir)
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("MANIFEST")}
    manifest["extra"] = {**(extra or {}), "rank": rank, "world": world}
    path = os.path.join(local_dir, rank_manifest_name(rank))
    with open(path, "w") as f:
        json.dump(manifest, f)
        f.flush()
        os.fsync(f.fileno())


def upload_rank(local_dir: str, uri: str, rank: int) -> None:
    """Put one rank's shards (``local_dir``, its rank manifest already written there) into
    the checkpoint directory ``uri`` that every rank of the job writes: the shards first,
    the rank manifest last, so a manifest that is there vouches for files that were
    complete. On local (shared) disk each file is fsynced; object stores put whole objects.
    """
    import tempfile

    manifest = rank_manifest_name(rank)
    with tempfile.TemporaryDirectory(prefix="branchout-manifest-") as aside:
        os.replace(os.path.join(local_dir, manifest), os.path.join(aside, manifest))  # held back
        storage.upload_dir(local_dir, uri)
        if storage.is_local(uri):
            dst = storage.local_path(uri)
            for root, _, names in os.walk(local_dir):
                for name in names:
                    _fsync_path(os.path.join(dst, os.path.relpath(os.path.join(root, name), local_dir)))
        storage.upload_file(os.path.join(aside, manifest), storage.join(uri, manifest))
    if storage.is_local(uri):
        _fsync_path(os.path.join(storage.local_path(uri), manifest))
        _fsync_path(storage.local_path(uri))


def _manifests(uri: str, world: int | None) -> tuple[list[dict], list[str]]:
    """The manifests of a published directory (one, or one per rank) and what is missing."""
    if world is None:
        manifest = read_manifest(uri)
        return ([manifest] if manifest else []), ([] if manifest else [f"{MANIFEST} missing (never finished publishing)"])
    found, problems = [], []
    for rank in range(world):
        manifest = read_manifest(uri, rank_manifest_name(rank))
        if manifest is None:
            problems.append(f"{rank_manifest_name(rank)} missing (rank {rank} never finished writing)")
        elif (manifest.get("extra") or {}).get("world", world) != world:
            problems.append(f"written by {manifest['extra']['world']} workers, this job has {world}")
        else:
            found.append(manifest)
    return found, problems


def verify_local(local_dir: str, manifests: list[dict], full: bool = True) -> list[str]:
    """Problems of ``local_dir`` against its manifests; empty when it verifies.

    ``full=False`` checks presence and sizes only (cheap; used to pick what to keep);
    loaders always check SHA-256 too.
    """
    problems, to_hash = [], {}
    for manifest in manifests:
        if not isinstance(manifest.get("files"), dict):
            problems += manifest.get("invalid") or ["manifest unreadable"]
            continue
        for rel, meta in manifest["files"].items():
            path = os.path.join(local_dir, rel)
            if not os.path.isfile(path):
                problems.append(f"{rel}: missing")
            elif os.path.getsize(path) != meta["size"]:
                problems.append(f"{rel}: size {os.path.getsize(path)} != {meta['size']} (truncated?)")
            elif full:
                to_hash[path] = (rel, meta["sha256"])
    digests = _hash_all(list(to_hash))
    problems += [f"{rel}: SHA-256 mismatch (corrupted)" for path, (rel, want) in to_hash.items()
                 if digests[path] != want]
    return problems


def fetch_verified(uri: str, local_dir: str | None = None, world: int | None = None) -> str:
    """A local, verified copy of the published directory at ``uri``.

    ``world`` is set for sharded checkpoints written by that many ranks.

    Raises:
        CorruptCheckpointError: naming the directory and every bad file.
    """
    if not storage.exists(uri):
        raise CorruptCheckpointError(uri, ["does not exist"])
    manifests, problems = _manifests(uri, world)
    if problems:
        raise CorruptCheckpointError(uri, problems)
    path = storage.download_dir(uri, local_dir)
    problems = verify_local(path, manifests)
    if problems:
        raise CorruptCheckpointError(uri, problems)
    return path


def written_world(uri: str) -> int | None:
    """How many ranks wrote the sharded checkpoint at ``uri``, as its rank-0 manifest says;
    None when it has none or the number is not one."""
    manifest = read_manifest(uri, rank_manifest_name(0))
    extra = manifest.get("extra") if isinstance(manifest, dict) else None
    world = extra.get("world") if isinstance(extra, dict) else None
    return world if isinstance(world, int) and not isinstance(world, bool) and 1 <= world <= 1 << 20 else None


def newest_good(parent_uri: str, names: list[str], world: int | None = None,
                local_dir: str | None = None, any_world: bool = False) -> tuple[str | None, str | None, list[str]]:
    """Walk ``names`` (oldest first) from the newest back to the first that verifies.

    ``any_world``: a sharded checkpoint verifies against as many rank manifests as it was
    written by (``written_world``), not ``world`` (a job that can reshard it).

    Returns:
        (name, local path, one line per checkpoint skipped and why).
    """
    skipped = []
    for name in reversed(names):
        uri = storage.join(parent_uri, name)
        try:
            path = fetch_verified(uri, local_dir, (written_world(uri) or world) if any_world else world)
        except CorruptCheckpointError as e:
            skipped.append(str(e))
            continue
        return name, path, skipped
    return None, None, skipped


def retain(parent_uri: str, names: list[str], keep: int, world: int | None = None,
           verify: Callable[[str], bool] | None = None, delete: bool = True,
           protect: set[str] = frozenset()) -> list[str]:
    """Delete all but the newest ``keep`` good checkpoints; returns what was deleted.

    "Good" means verified in full now (every file's SHA-256 against its manifest), not
    judged by sizes: a bit flip that keeps a file's size would otherwise pass for good and
    the last good checkpoint be deleted in its favour. Nothing is deleted unless one
    checkpoint verifies, nor anything newer than the newest good one (another rank may
    still be writing it). ``verify(uri)`` replaces the check (the distributed training
    path has every rank verify its own shards and agree); with ``delete=False`` the walk
    only returns what would go (the ranks that must take part in ``verify`` but not delete).
    ``protect``: names never deleted (a fine-tune's best checkpoint under ``keep_best``).
    """
    verify = verify or (lambda uri: not full_problems(uri, world))
    kept: list[str] = []
    for name in reversed(names):
        if verify(storage.join(parent_uri, name)):
            kept.append(name)
            if len(kept) == keep:
                break
    if not kept:
        return []
    doomed = [n for n in names[: names.index(kept[0])] if n not in kept and n not in protect]
    for name in doomed if delete else []:
        storage.remove_dir(storage.join(parent_uri, name))
    return doomed


def rank_problems(uri: str, rank: int, world: int) -> list[str]:
    """Problems of one rank's shards of a sharded checkpoint, SHA-256 included: what that
    rank wrote, checked by that rank, so no single process reads the whole checkpoint (on
    object stores it downloads only its own files)."""
    import tempfile

    manifest = read_manifest(uri, rank_manifest_name(rank))
    if manifest is None:
        return [f"{rank_manifest_name(rank)} missing (rank {rank} never finished writing)"]
    if not isinstance(manifest.get("files"), dict):
        return manifest.get("invalid") or [f"{rank_manifest_name(rank)} unreadable"]
    if (manifest.get("extra") or {}).get("world", world) != world:
        return [f"{rank_manifest_name(rank)} does not belong to a {world}-worker job"]
    if storage.is_local(uri):
        return verify_local(storage.local_path(uri), [manifest])
    with tempfile.TemporaryDirectory(prefix="branchout-verify-") as tmp:
        for rel in manifest["files"]:
            os.makedirs(os.path.dirname(os.path.join(tmp, rel)) or tmp, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):  # reported as missing below
                storage.download_file(storage.join(uri, rel), os.path.join(tmp, rel))
        return verify_local(tmp, [manifest])


def full_problems(uri: str, world: int | None = None) -> list[str]:
    """Every problem of the published directory at ``uri``, SHA-256 included."""
    try:
        fetch_verified_into_tmp(uri, world)
    except CorruptCheckpointError as e:
        return e.problems
    return []


def fetch_verified_into_tmp(uri: str, world: int | None = None) -> None:
    """``fetch_verified`` whose copy (object stores) is discarded: verification only."""
    import tempfile

    if storage.is_local(uri):
        fetch_verified(uri, world=world)
        return
    with tempfile.TemporaryDirectory(prefix="branchout-verify-") as tmp:
        fetch_verified(uri, tmp, world)


def is_published(uri: str) -> bool:
    """Cheap check (manifest present) used to find finished outputs; loaders still verify."""
    return storage.exists(storage.join(uri, MANIFEST))


# SHA-256 of local files this process already hashed, by (path, size, mtime): retention
# verifies the kept checkpoints at every save, and an unchanged file need not be read again.
_DIGESTS: dict[tuple[str, int, int], str] = {}


def _sha256_file(path: str) -> str:
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        if len(_DIGESTS) > 100_000:
            _DIGESTS.clear()
        _DIGESTS[key] = storage.sha256_file(path)
    return _DIGESTS[key]




def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
