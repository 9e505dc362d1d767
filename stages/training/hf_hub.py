"""Hub datasets, streamed: never downloaded whole, read shard by shard by the workers.

A hub dataset is resolved to a commit first (``hub_commit``): the commit, not a branch
name, goes into the data fingerprint and into every read, so a cached packing is reused
only for the exact same data and all shards of one packing come from one commit.
``datasets.load_dataset(..., streaming=True)`` then exposes the dataset's files as shards;
each shard is one read unit (``documents.ReadUnit`` with ``start`` = shard index and
``stop`` = shard count), so the data stage spreads a hub dataset over the cluster as it
does local files. Without network (or with ``HF_HUB_OFFLINE=1``) every entry point fails
with one line naming the dataset.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa

from branchout.stages.prepare.units import DataError, ReadUnit

ROWS_PER_BATCH = 1000


def _unreachable(name: str, e: Exception) -> DataError:
    reason = " ".join(str(e).split())[:160] or type(e).__name__
    return DataError(f"{name}: hub dataset unreachable ({reason}); check the network, or download it "
                     "and point dataset.path at its files")


def hub_commit(name: str, revision: str | None) -> str:
    """The commit ``revision`` (a branch, tag or commit; default: main) points at now.

    Raises:
        DataError: the hub cannot be reached or has no such dataset or revision.
    """
    from huggingface_hub import HfApi

    try:
        return HfApi().dataset_info(name, revision=revision).sha
    except Exception as e:  # offline mode, DNS, 401/404: each is the same one line to the user
        raise _unreachable(name, e) from None


def _stream(name: str, split: str, commit: str):
    import datasets

    try:
        return datasets.load_dataset(name, split=split, revision=commit, streaming=True)
    except Exception as e:  # datasets raises ConnectionError, FileNotFoundError, ValueError...
        raise _unreachable(name, e) from None


def hub_units(name: str, split: str, revision: str | None) -> list[ReadUnit]:
    """One read unit per shard (data file) of the streamed dataset, pinned to one commit.

    Raises:
        DataError: the hub cannot be reached.
    """
    commit = hub_commit(name, revision)
    shards = _stream(name, split, commit).num_shards
    return [ReadUnit("hub", name, i, shards, 0, split, commit) for i in range(shards)]


def hub_columns(unit: ReadUnit, column: str, setting: str = "text_column") -> Iterator[pa.Array]:
    """The ``column`` of one shard, ``ROWS_PER_BATCH`` rows at a time.

    Raises:
        DataError: the hub cannot be reached, or the dataset has no such column.
    """
    stream = _stream(unit.path, unit.split, unit.revision).shard(num_shards=unit.stop, index=unit.start)
    batch: list = []
    try:
        for row in stream:
            if column not in row:
                raise DataError(f"{unit.path}: no column {column!r} (columns: {', '.join(row)}); "
                                f"set dataset.{setting}")
            batch.append(row[column])
            if len(batch) == ROWS_PER_BATCH:
                yield pa.array(batch)
                batch = []
    except (ConnectionError, TimeoutError, OSError) as e:
        raise _unreachable(unit.path, e) from None
    if batch:
        yield pa.array(batch)
