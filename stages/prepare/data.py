"""Data stage: stream a dataset through tokenization on every node into packed block shards.

``prepare`` is the stage's one entry point. It cuts the dataset into read units
(``stages/prepare/documents.py``), tokenizes them in parallel (``stages/prepare/packing.py``: Ray Data
across the cluster when Ray is up, this process otherwise; byte-identical output either
way), packs the training side into ``seq_len`` blocks as they fill, decides the
decontaminated held-out split once every document was seen (``stages/prepare/split.py``), and
publishes the shards with a manifest (``stages/prepare/blocks.py`` reads them back lazily).
Memory is bounded by the read unit and a few buffers, not by the corpus; the held-out
side's sampled shingles are the one thing that grows (with ``heldout_fraction``).

Instruction data (a dataset with prompt/response or messages columns) is not a token
stream: ``prepare`` hands it to ``stages/prepare/instruct.py`` (one example per row, with token
roles for the loss mask), cached and published the same way.

Packed data is cached under ``<storage>/cache/data/<key>/``; the key hashes the data
fingerprint, the tokenizer, the block length, the split, the pretraining reference a
domain was decontaminated against and ``PACKING_VERSION``. A second run (or a second
domain reading the same files) reuses it.

This module also re-exports the public names other modules import from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, fields

import numpy as np

from branchout import storage
from branchout.stages.job import DataJob
from branchout.stages.prepare.blocks import (
    SHARD_BLOCKS,
    BlockWriter,
    PackedBlocks,
    fetch_member,
    open_blocks,
)
from branchout.stages.prepare.documents import (
    UNIT_BYTES,
    DataError,
    Source,
    file_size,
    iter_documents,
    load_documents,
    plan_units,
    resolve_source,
    taper,
)
from branchout.stages.prepare.fingerprints import diagnose, fingerprint
from branchout.stages.prepare.packing import (
    Progress,
    Staging,
    cluster_cpus,
    encoded_tables,
    pack_stream,
)
from branchout.stages.prepare.split import Decontaminator, is_heldout
from branchout.storage import checkpoint

__all__ = ["DataError", "PackedBlocks", "PackedInfo", "Source", "diagnose", "fingerprint", "is_heldout",
           "iter_documents", "load_documents", "open_blocks", "prepare", "resolve_source"]

# Bump when packing changes so old caches are not reused.
PACKING_VERSION = 2


@dataclass
class PackedInfo:
    """Where packed blocks are and how many; returned by ``prepare`` to the driver."""

    uri: str
    seq_len: int
    dtype: str
    train_blocks: int
    heldout_blocks: int
    train_docs: int
    heldout_docs: int
    cached: bool = False
    heldout_moved_near_duplicates: int = 0  # held-out → training: mostly training text
    heldout_dropped_pretraining_overlap: int = 0  # held-out → training: mostly pretraining text
    tokens: int = 0
    nodes: int = 0  # Ray nodes that tokenized it (0: reused from the cache)
    kind: str = "text"  # "instruct": one example per row, blocks are examples (stages/prepare/instruct.py)
    examples_dropped: int = 0  # instruction examples whose answer starts beyond seq_len
    examples_skipped: int = 0  # instruction rows with an empty prompt or answer

    @property
    def heldout_tokens(self) -> int:
        return self.heldout_blocks * self.seq_len

    @classmethod
    def from_dict(cls, values: dict) -> PackedInfo:
        """From a record's outputs, which also hold keys of other kinds (pid, node)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def cache_key(fp: str, tok_hash: str, seq_len: int, fraction: float, seed: int,
              reference: str | None = None, decontaminate: bool = True,
              shard_blocks: int = SHARD_BLOCKS) -> str:
    payload = json.dumps([PACKING_VERSION, fp, tok_hash, seq_len, fraction, seed, reference,
                          decontaminate, shard_blocks])
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def prepare(job: DataJob, *, decontaminate: bool = True, unit_bytes: int | None = None,
            shard_blocks: int = SHARD_BLOCKS) -> PackedInfo:
    """Tokenize and pack ``job.dataset`` (or reuse the cache) and return where it is.

    Progress is posted to ``job.hub_name`` under ``job.name``. The keyword options are for
    benchmarks and tests, never set by a pipeline:

    Args:
        decontaminate: off only to measure what decontamination removes.
        unit_bytes: input bytes per read unit (the output does not depend on it); by
            default ``unit_size`` of the dataset and the cluster.
        shard_blocks: blocks per shard file.

    Raises:
        DataError: unreadable data (naming the file), or no training or no held-out block.
    """
    from branchout.stages.prepare.tokenizer import rust_tokenizer

    ds, seq_len, split_seed, heldout_fraction = job.dataset, job.seq_len, job.split_seed, job.heldout_fraction
    data_fingerprint = job.fingerprint or fingerprint(ds)  # the driver's, so this node does not hash again
    if ds.is_instruction:
        return _prepare_instruct(job, data_fingerprint, shard_blocks)
    # the references' own cache keys (their folder names) name what this was decontaminated against
    ref_key = "+".join(uri.rstrip("/").rsplit("/", 1)[-1] for uri in job.reference_uris) or None
    key = cache_key(data_fingerprint, job.tokenizer_hash, seq_len, heldout_fraction, split_seed, ref_key,
                    decontaminate, shard_blocks)
    uri = storage.join(job.cache_root, key)
    cached = _cached(uri)
    if cached is not None:
        return cached
    tokenizer, eos, vocab = rust_tokenizer(checkpoint.fetch_verified(job.tokenizer_uri))
    dtype = np.uint16 if vocab <= np.iinfo(np.uint16).max else np.uint32
    cpus = cluster_cpus()  # None: no Ray, this process tokenizes alone
    workers = max(1, int(cpus or 1))
    units = taper(plan_units(ds, unit_bytes or unit_size(resolve_source(ds), cpus or os.cpu_count() or 1)), workers)
    progress = Progress(job.hub_name, job.name, sum(u.size for u in units))
    # Each shard goes to storage the moment it is full (Publisher): local scratch holds a few
    # shards, the held-out candidates and the shingle spill, never the packed corpus.
    with tempfile.TemporaryDirectory(prefix="branchout-pack-") as tmp, checkpoint.Publisher(uri) as publisher:
        out = os.path.join(tmp, "out")
        os.makedirs(out)
        train = BlockWriter(out, "train", seq_len, dtype, shard_blocks, on_shard=publisher.add)
        staging = Staging(os.path.join(tmp, "heldout.staged"), dtype)
        decon = Decontaminator(os.path.join(tmp, "shingles"), enabled=decontaminate)
        tables = encoded_tables(units, workers, column=ds.text_column, tokenizer=tokenizer, eos=eos,
                                dtype=np.dtype(dtype).name, seed=split_seed, fraction=heldout_fraction)
        hashed_train = pack_stream(tables, train.write, staging, decon, progress)
        progress.push()
        decisions = decon.finish(os.path.join(out, "train.shingles"), [_reference(uri) for uri in job.reference_uris])
        publisher.add(os.path.join(out, "train.shingles"))
        heldout = BlockWriter(out, "heldout", seq_len, dtype, shard_blocks, on_shard=publisher.add)
        staging.route(decisions.fate == 0, heldout.write, train.write)  # moved documents train last
        shards = {"train": train.close(), "heldout": heldout.close()}
        kept = int((decisions.fate == 0).sum())
        _check_sides(ds.path, train.blocks, heldout.blocks, seq_len, heldout_fraction,
                     hashed_train + len(decisions.fate), len(decisions.fate) - kept)
        info = PackedInfo(uri=uri, seq_len=seq_len, dtype=np.dtype(dtype).name, train_blocks=train.blocks,
                          heldout_blocks=heldout.blocks, train_docs=hashed_train + len(decisions.fate) - kept,
                          heldout_docs=kept, heldout_moved_near_duplicates=decisions.moved,
                          heldout_dropped_pretraining_overlap=decisions.dropped, tokens=progress.tokens,
                          nodes=len(progress.nodes))
        meta = {k: v for k, v in asdict(info).items() if k not in ("uri", "cached", "nodes")}
        with open(os.path.join(out, "meta.json"), "w") as f:
            json.dump({**meta, "shard_blocks": shard_blocks, "shards": shards}, f, indent=1)
        publisher.add(os.path.join(out, "meta.json"))
        publisher.commit()
    return info


def _prepare_instruct(job: DataJob, fp: str, shard_blocks: int) -> PackedInfo:
    """Instruction data: one example per row (``stages/prepare/instruct.py``), cached and published
    like packed blocks. It is not decontaminated against the pretraining corpus (see there)."""
    from branchout.stages.prepare.documents import plan_units
    from branchout.stages.prepare.instruct import prepare_examples

    progress = Progress(job.hub_name, job.name, sum(u.size for u in plan_units(job.dataset)))
    uri, meta, cached = prepare_examples(job.dataset, checkpoint.fetch_verified(job.tokenizer_uri), job.tokenizer_hash,
                                         job.seq_len, job.heldout_fraction, job.split_seed, job.cache_root, fp,
                                         progress, shard_blocks)
    progress.push()
    return PackedInfo.from_dict({**meta, "uri": uri, "cached": cached, "nodes": 0 if cached else 1})


def _cached(uri: str) -> PackedInfo | None:
    if not checkpoint.is_published(uri):
        return None
    try:
        meta = json.loads(storage.read_text(storage.join(uri, "meta.json")))
        return PackedInfo.from_dict({**meta, "uri": uri, "cached": True})
    except (OSError, TypeError, json.JSONDecodeError):
        return None  # an unreadable cache entry is rebuilt


def _check_sides(label: str, train_blocks: int, heldout_blocks: int, seq_len: int, fraction: float,
                 docs: int, removed: int) -> None:
    """Raises:
        DataError: no training block, or no held-out block (after decontamination).
    """
    if train_blocks == 0:
        raise DataError(f"{label}: too little text for one {seq_len}-token training block")
    if heldout_blocks == 0:
        why = f" after moving {removed} near-duplicates of training text to training" if removed else ""
        raise DataError(f"{label}: held-out split ({fraction:.0%} of {docs} documents{why}) is shorter than "
                        f"one {seq_len}-token block; add data or raise evaluate.heldout_fraction")


def unit_size(src: Source, cpus: float) -> int:
    """About 8 read units per CPU that tokenizes, so the last wave of tasks is short, but
    ``UNIT_BYTES`` to 4× that each: tasks cost tens of milliseconds to schedule, and a
    worker holds one unit's text and tokens."""
    total = sum(map(file_size, src.files))
    return int(min(4 * UNIT_BYTES, max(UNIT_BYTES, total / (8 * cpus))))


def _reference(uri: str) -> np.ndarray:
    """A pretraining corpus's training shingle set, verified, memory-mapped."""
    path = fetch_member(uri, "train.shingles")
    return np.memmap(path, np.uint64, "r") if os.path.getsize(path) else np.empty(0, np.uint64)
