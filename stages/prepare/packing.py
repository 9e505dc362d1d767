"""Tokenize read units on every node (Ray Data), pack the token stream into block shards.

Work is split in two, by what can run in parallel and what must run in order:

- ``encode_unit`` (parallel, one read unit per call): read the unit's documents, decide
  each one's side by its hash, tokenize with the Rust tokenizer, append EOS, and hash the
  sampled shingles the decontamination needs. Under Ray, Ray Data runs it in a pool of
  ``map_batches`` actors, one per CPU of the cluster, each holding its tokenizer; Ray Data
  keeps a second unit queued at every actor, so a core starts its next unit the moment one
  ends (with plain tasks each unit waited ~0.2 s for Ray Data to notice the last one had
  finished and dispatch the next). Without Ray (unit tests, a laptop) the same function
  runs in this process.
- ``pack_stream`` (in order, in the calling process): cut the training side into blocks as
  they fill, stage the held-out side on local disk, spill training shingles. This is
  memcpy-level work on arrays; text never reaches it.

Both paths feed ``pack_stream`` the same tables in the same (unit) order, so the output is
byte-identical with and without Ray and whatever the unit size: a document's tokens, side
and shingles depend only on its text, and packing is a pure function of the stream.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from itertools import chain

import numpy as np
import pyarrow as pa

from branchout.stages.prepare.documents import DataError, ReadUnit, unit_texts
from branchout.stages.prepare.split import is_heldout, shingles

ENCODE_DOCS = 1000  # documents per encode call, as the reference streaming loop batches them
ENCODE_CHARS = 1 << 22  # and characters per call: the Rust tokenizer holds ~35 bytes a character
PIECE_CHARS = 1 << 16  # longer documents are encoded in pieces (a 12 MB one took 3.6 GB whole)
_PIECE_CUT = re.compile(r"(?<=\S)\s")  # whitespace after non-whitespace: no pre-token spans it
_tokenizers: dict[str, object] = {}


def _tokenizer(spec: str):
    """The Rust tokenizer built from its JSON, once per worker process."""
    key = hashlib.sha256(spec.encode()).hexdigest()
    if key not in _tokenizers:
        from tokenizers import Tokenizer

        _tokenizers.clear()
        _tokenizers[key] = Tokenizer.from_str(spec)
    return _tokenizers[key]


def _node() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    except Exception:  # outside any Ray worker context: this process is the only node
        return "local"


def encode_unit(unit: ReadUnit, column: str, tokenizer: str, eos: int, dtype: str, seed: int,
                fraction: float) -> pa.Table:
    """One unit's documents as rows: ``tokens`` (ids + EOS), ``heldout``, ``shingles``.

    Row 0's ``info`` carries the unit's bytes, node and, when the unit cannot be read, the
    error line (raised by the consumer, so it reaches the user as it is).
    """
    info: dict = {"bytes": unit.size, "node": _node()}
    parts, lengths, held = [], [], []
    try:
        tok = _tokenizer(tokenizer)
        for texts in unit_texts(unit, column):
            tokens, lens = token_ids(tok, texts, eos, dtype)
            parts.append(tokens)
            lengths.append(lens)
            held += [is_heldout(t, seed, fraction) for t in texts]
    except DataError as e:
        info["error"] = str(e)
        parts, lengths, held = [], [], []
    tokens = np.concatenate(parts) if parts else np.empty(0, dtype)
    lens = np.concatenate(lengths) if lengths else np.empty(0, np.int64)
    hashes, counts = shingles(tokens, lens)
    if not len(lens):  # one row still carries the unit's info
        lens, counts, held = np.zeros(1, np.int64), np.zeros(1, np.int64), [False]
    infos = [json.dumps(info)] + [None] * (len(lens) - 1)
    return pa.table({
        "tokens": _lists(tokens, lens), "heldout": pa.array(held, pa.bool_()),
        "shingles": _lists(hashes, counts), "info": pa.array(infos, pa.string())})


def token_ids(tok, texts: list[str], eos: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Every text's ids followed by EOS, laid end to end, and tokens per text (EOS included).

    A text longer than ``PIECE_CHARS`` is encoded in pieces cut at whitespace that follows
    non-whitespace. A byte-level BPE's pre-tokenizer (GPT-2's regex: what branchout trains)
    never spans such a point, so the ids are exactly those of the whole text; other
    pre-tokenizers may differ at the cuts, every 64K characters.
    """
    pieces, owner = [], []
    for i, text in enumerate(texts):
        cut = _pieces(text)
        pieces += cut
        owner += [i] * len(cut)
    last = np.r_[np.diff(owner) != 0, True] if owner else np.empty(0, bool)
    parts, sizes = [], []
    start = 0
    while start < len(pieces):
        stop, chars = start + 1, len(pieces[start])
        while stop < len(pieces) and stop - start < ENCODE_DOCS and chars + len(pieces[stop]) <= ENCODE_CHARS:
            chars += len(pieces[stop])
            stop += 1
        ids = [e.ids for e in tok.encode_batch_fast(pieces[start:stop], add_special_tokens=False)]
        for row, ends in zip(ids, last[start:stop], strict=True):
            if ends:
                row.append(eos)
        sizes += map(len, ids)
        parts.append(np.fromiter(chain.from_iterable(ids), dtype, sum(map(len, ids))))
        start = stop
    lens = np.bincount(owner, weights=sizes, minlength=len(texts)).astype(np.int64)
    return (np.concatenate(parts) if parts else np.empty(0, dtype)), lens


def _pieces(text: str) -> list[str]:
    if len(text) <= PIECE_CHARS:
        return [text]
    out, start = [], 0
    while len(text) - start > PIECE_CHARS:
        cut = _PIECE_CUT.search(text, start + PIECE_CHARS)
        if cut is None:
            break  # no whitespace left: the rest is one piece
        out.append(text[start:cut.start()])
        start = cut.start()
    out.append(text[start:])
    return out


def _lists(values: np.ndarray, lengths: np.ndarray) -> pa.LargeListArray:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values))


def _flat(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(values, per-row lengths) of a list column, without copying the values."""
    arr = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    offsets = np.asarray(arr.offsets)
    values = arr.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]]
    return values, np.diff(offsets)


class UnitEncoder:
    """Ray Data ``map_batches`` actor: ``encode_unit`` of one unit per batch."""

    def __init__(self, **kwargs):
        # One CPU per actor, so one tokenizer thread per actor, not one per core of the node.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        self.kwargs = kwargs

    def __call__(self, batch: pa.Table) -> pa.Table:
        (unit,) = batch.column("unit").to_pylist()
        return encode_unit(ReadUnit(**json.loads(unit)), **self.kwargs)


def cluster_cpus() -> float | None:
    """CPUs of the connected Ray cluster (1 if it reports none), or None without Ray."""
    import ray

    return ray.cluster_resources().get("CPU", 1) if ray.is_initialized() else None


def encoded_tables(units: list[ReadUnit], workers: int, **kwargs) -> Iterator[pa.Table]:
    """``encode_unit`` of every unit, in unit order: on the Ray cluster when one is connected
    and there is more than one unit (a pool of ``workers`` actors to start), else in this
    process."""
    import ray

    if len(units) < 2 or not ray.is_initialized():
        for unit in units:
            yield encode_unit(unit, **kwargs)
        return
    import logging

    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # one line per dataset is noise here
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # packing order = document order
    ctx.enable_progress_bars = False  # progress goes to the run's hub instead
    ds = ray.data.from_items([{"unit": json.dumps(asdict(u))} for u in units], override_num_blocks=len(units))
    ds = ds.map_batches(UnitEncoder, batch_size=1, batch_format="pyarrow", fn_constructor_kwargs=kwargs, num_cpus=1,
                        compute=_pool(len(units), workers))
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2)


def _pool(units: int, cpus: int):
    """Starts with one actor per CPU the cluster has now (at most one per unit) and needs
    only one: actors that find no free CPU (other stages hold them) stay pending while the
    ready ones work, as tasks would queue. It may grow to one actor per unit: Ray Data adds
    actors only within the CPUs the cluster has, so on an autoscaling cluster that starts
    small the pool grows with its nodes. Two units in flight per actor (Ray Data's default,
    set here because the no-gap hand-over above depends on it)."""
    from ray.data import ActorPoolStrategy

    size = max(1, min(units, cpus))
    return ActorPoolStrategy(min_size=1, max_size=max(size, units), initial_size=size, max_tasks_in_flight_per_actor=2)


class Staging:
    """The held-out candidates' tokens on local disk, until the split is decided."""

    def __init__(self, path: str, dtype):
        self.path, self.dtype = path, np.dtype(dtype)
        self.lengths: list[np.ndarray] = []
        self._file = open(path, "wb")  # noqa: SIM115 - closed in docs()

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        tokens.astype(self.dtype, copy=False).tofile(self._file)
        self.lengths.append(lengths)

    def route(self, keep: np.ndarray, to_heldout: Callable[[np.ndarray], None],
              to_train: Callable[[np.ndarray], None], chunk_tokens: int = 1 << 22) -> None:
        """Documents with ``keep`` to ``to_heldout``, the others to ``to_train``, in order,
        reading ~``chunk_tokens`` at a time."""
        self._file.close()
        lengths = np.concatenate(self.lengths) if self.lengths else np.empty(0, np.int64)
        ends = np.cumsum(lengths)
        data = np.memmap(self.path, self.dtype, "r") if ends.size and ends[-1] else np.empty(0, self.dtype)
        first, start = 0, 0
        while first < len(lengths):
            last = max(first + 1, int(np.searchsorted(ends, start + chunk_tokens, side="right")))
            stop = int(ends[last - 1])
            tokens, mask = np.array(data[start:stop]), np.repeat(keep[first:last], lengths[first:last])
            to_heldout(tokens[mask])
            to_train(tokens[~mask])
            first, start = last, stop


class Progress:
    """Documents, tokens, throughput and ETA of one data job, pushed to the run's hub."""

    def __init__(self, hub: str | None, job: str, total_bytes: int, every_s: float = 1.0):
        import ray

        from branchout.core.progress import connect_hub

        self.hub = connect_hub(hub) if hub and ray.is_initialized() else None
        self.job, self.total, self.every = job, total_bytes, every_s
        self.docs = self.tokens = self.bytes = 0
        self.nodes: set[str] = set()
        self.started = self._pushed = time.perf_counter()

    def unit(self, info: dict) -> None:
        self.bytes += info.get("bytes", 0)
        self.nodes.add(info.get("node", "local"))

    def add(self, docs: int, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens
        if self.hub is not None and time.perf_counter() - self._pushed >= self.every:
            self.push()

    def fields(self) -> dict:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        left = (self.total - self.bytes) * elapsed / self.bytes if self.bytes and self.total else None
        return {"docs": self.docs, "tokens": self.tokens, "tokens_per_s": self.tokens / elapsed,
                "eta_s": left, "nodes": len(self.nodes)}

    def push(self) -> None:
        self._pushed = time.perf_counter()
        if self.hub is not None:
            self.hub.update.remote(self.job, self.fields())  # fire and forget


def pack_stream(tables, on_train: Callable[[np.ndarray], None], staging: Staging, decon,
                progress) -> int:
    """Route every document of ``tables``: training tokens to ``on_train``, held-out
    candidates to ``staging``, shingles to ``decon``. Returns the training documents.

    Raises:
        DataError: a unit could not be read (the line its worker reported).
    """
    train_docs = 0
    for table in tables:
        for info in table.column("info").drop_null().to_pylist():
            info = json.loads(info)
            if "error" in info:
                raise DataError(info["error"])
            progress.unit(info)
        tokens, lengths = _flat(table.column("tokens"))
        hashes, counts = _flat(table.column("shingles"))
        held = table.column("heldout").to_numpy(zero_copy_only=False) & (lengths > 0)
        real = lengths > 0
        if held.any():
            per_token = np.repeat(held, lengths)
            per_hash = np.repeat(held, counts)
            on_train(tokens[~per_token])
            decon.add_train(hashes[~per_hash])
            staging.add(tokens[per_token], lengths[held])
            decon.add_heldout(hashes[per_hash], counts[held])
        else:
            on_train(tokens)
            decon.add_train(hashes)
        train_docs += int((real & ~held).sum())
        progress.add(int(real.sum()), len(tokens))
    return train_docs
