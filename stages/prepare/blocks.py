"""Packed blocks on storage: written shard by shard, read shard by shard.

Layout of one packed dataset (``<cache>/data/<key>/``, published with a manifest)::

    meta.json               counts, seq_len, dtype, shard_blocks, the shard names per side
    00000-train.bin …       ``shard_blocks`` blocks of ``seq_len`` token ids each (the last
    00000-heldout.bin …     shard of a side may hold fewer); block ``i`` is row
                            ``i % shard_blocks`` of shard ``i // shard_blocks``
    train.shingles          the training side's sampled shingle set (``stages.prepare.split``)

``PackedBlocks`` is what training and evaluation index like a ``[blocks, seq_len]`` array
(``len``, ``shape``, ``x[i:j]``, ``x[index_array]``). It opens a shard only when a block
in it is asked for: a local shard is memory-mapped, an object-store shard is downloaded
once into a content-addressed local cache. Either way the shard's SHA-256 is checked
against the manifest the first time a process touches it, so a worker reads (and
verifies) only the shards its blocks come from, never the whole set.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable

import numpy as np

from branchout import storage
from branchout.storage.checkpoint import MANIFEST, CorruptCheckpointError, manifest_problems

# 8,192 blocks: 32 MiB shards at 2,048 uint16 tokens a block; stages/training/batches.py assumes it.
SHARD_BLOCKS = 8192


def shard_name(index: int, side: str) -> str:
    return f"{index:05d}-{side}.bin"


class BlockWriter:
    """Cuts a token stream into ``seq_len`` blocks, written to shard files as they fill;
    ``on_shard(path)`` is called with each shard the moment it is complete (``Publisher.add``
    sends it to storage, so finished shards do not pile up on local disk)."""

    def __init__(self, out_dir: str, side: str, seq_len: int, dtype, shard_blocks: int = SHARD_BLOCKS,
                 on_shard: Callable[[str], None] | None = None):
        self.dir, self.side, self.seq_len = out_dir, side, seq_len
        self.dtype = np.dtype(dtype)
        self.shard_blocks = shard_blocks
        self.on_shard = on_shard
        self.shards: list[str] = []
        self.blocks = 0
        self._carry = np.empty(0, self.dtype)
        self._file = None

    def write(self, tokens: np.ndarray) -> None:
        buf = np.concatenate([self._carry, tokens.astype(self.dtype, copy=False)])
        full = len(buf) // self.seq_len
        rows = buf[: full * self.seq_len].reshape(full, self.seq_len)
        self._carry = buf[full * self.seq_len:].copy()
        while len(rows):
            room = self.shard_blocks - self.blocks % self.shard_blocks
            if self._file is None:
                self.shards.append(shard_name(len(self.shards), self.side))
                self._file = open(os.path.join(self.dir, self.shards[-1]), "wb")  # noqa: SIM115
            rows[:room].tofile(self._file)
            self.blocks += min(room, len(rows))
            rows = rows[room:]
            if self.blocks % self.shard_blocks == 0:
                self._finish_shard()

    def _finish_shard(self) -> None:
        self._file.close()
        self._file = None
        if self.on_shard is not None:
            self.on_shard(os.path.join(self.dir, self.shards[-1]))

    def close(self) -> list[str]:
        """The shard names; the tail shorter than a block is dropped."""
        if self._file is not None:
            self._finish_shard()
        return self.shards


class PackedBlocks:
    """One side (``train`` or ``heldout``) of a packed dataset as a read-only 2-D array."""

    ndim = 2

    def __init__(self, uri: str, side: str, local_dir: str | None = None):
        self.uri, self.side = uri, side
        self._files = manifest_files(uri)
        self.meta = meta = json.loads(self._verified_bytes("meta.json"))
        self.seq_len, self.dtype = meta["seq_len"], np.dtype(meta["dtype"])
        self.shape = (meta[f"{side}_blocks"], self.seq_len)
        self.shard_blocks = meta["shard_blocks"]
        self._names = meta["shards"][side]
        self._cache = local_dir
        self._maps: dict[int, np.memmap] = {}
        self.opened: list[str] = []  # shard names in the order this reader first touched them

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            rows = self[key[0]]
            return rows[key[1:]] if np.ndim(rows) == 1 else rows[(slice(None), *key[1:])]
        if isinstance(key, int | np.integer):
            return self._gather(np.array([key]))[0]
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step == 1:
                return self._range(start, max(start, stop))
            return self._gather(np.arange(start, stop, step))
        idx = np.asarray(key)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        return self._gather(idx.astype(np.int64))

    def _range(self, start: int, stop: int) -> np.ndarray:
        if stop <= start:
            return np.empty((0, self.seq_len), self.dtype)
        first, last = start // self.shard_blocks, (stop - 1) // self.shard_blocks
        parts = [self._shard(k)[max(start - k * self.shard_blocks, 0): stop - k * self.shard_blocks]
                 for k in range(first, last + 1)]
        return np.array(parts[0]) if len(parts) == 1 else np.concatenate(parts)

    def _gather(self, idx: np.ndarray) -> np.ndarray:
        n = len(self)
        idx = np.where(idx < 0, idx + n, idx)
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"block index out of range for {n} blocks")
        out = np.empty((len(idx), self.seq_len), self.dtype)
        shard_of = idx // self.shard_blocks
        for k in np.unique(shard_of):
            mask = shard_of == k
            out[mask] = self._shard(int(k))[idx[mask] - k * self.shard_blocks]
        return out

    def _shard(self, k: int) -> np.memmap:
        if k not in self._maps:
            name = self._names[k]
            rows = min(self.shard_blocks, len(self) - k * self.shard_blocks)
            self._maps[k] = np.memmap(self._fetch(name), self.dtype, "r", shape=(rows, self.seq_len))
            self.opened.append(name)
        return self._maps[k]

    def _verified_bytes(self, name: str) -> bytes:
        data = storage.read_bytes(storage.join(self.uri, name))
        if hashlib.sha256(data).hexdigest() != _want(self.uri, self._files, name)["sha256"]:
            raise CorruptCheckpointError(self.uri, [f"{name}: SHA-256 mismatch (corrupted)"])
        return data

    def _fetch(self, name: str) -> str:
        return fetch_member(self.uri, name, self._files, self._cache)


def manifest_files(uri: str) -> dict:
    """The ``files`` of the manifest of the published directory at ``uri``.

    Raises:
        CorruptCheckpointError: no readable manifest (never finished publishing).
    """
    try:
        manifest = json.loads(storage.read_text(storage.join(uri, MANIFEST)))
    except (OSError, ValueError):
        raise CorruptCheckpointError(uri, [f"{MANIFEST} missing or unreadable"]) from None
    problems = manifest_problems(manifest)  # its names and hashes become local file names
    if problems:
        raise CorruptCheckpointError(uri, [f"{MANIFEST}: {p}" for p in problems])
    return manifest["files"]


def _want(uri: str, files: dict, name: str) -> dict:
    if name not in files:
        raise CorruptCheckpointError(uri, [f"{name}: not in the manifest"])
    return files[name]


def fetch_member(uri: str, name: str, files: dict | None = None, local_dir: str | None = None) -> str:
    """A verified local file holding ``name`` of the published directory ``uri``: the file
    itself on local storage, else a copy in ``local_dir`` or the content-addressed cache.

    Raises:
        CorruptCheckpointError: the file is not in the manifest, or fails its size or SHA-256.
    """
    want = _want(uri, manifest_files(uri) if files is None else files, name)
    if storage.is_local(uri):
        path = os.path.join(storage.local_path(uri), name)
    else:
        folder = local_dir or storage.local_cache_dir("blocks", want["sha256"][:2])
        path = os.path.join(folder, name if local_dir else want["sha256"])
        if not (os.path.exists(path) and os.path.getsize(path) == want["size"]):
            os.makedirs(folder, exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            storage.write_bytes(tmp, storage.read_bytes(storage.join(uri, name)), durable=False)
            os.replace(tmp, path)
    if not os.path.exists(path) or os.path.getsize(path) != want["size"]:
        raise CorruptCheckpointError(uri, [f"{name}: missing or truncated"])
    if storage.sha256_file(path) != want["sha256"]:
        raise CorruptCheckpointError(uri, [f"{name}: SHA-256 mismatch (corrupted)"])
    return path


def open_blocks(info_uri: str, side: str, local_dir: str | None = None) -> PackedBlocks:
    """One side (``train`` or ``heldout``) as a ``[blocks, seq_len]`` array read lazily.

    Raises:
        CorruptCheckpointError: the manifest or ``meta.json`` is missing or fails its
            SHA-256; a shard that fails is reported when it is first read.
    """
    return PackedBlocks(info_uri, side, local_dir)
