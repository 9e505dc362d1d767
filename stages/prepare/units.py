"""The two names the data readers share (``documents`` for files, ``hub`` for hub datasets):
the error a user sees for a dataset, and one task's share of a dataset."""

from __future__ import annotations

from dataclasses import dataclass


class DataError(ValueError):
    """A dataset cannot be used; the message names the file (and line) or dataset."""


@dataclass(frozen=True)
class ReadUnit:
    """One task's share of a dataset.

    ``start``/``stop`` are byte offsets (text, json), row groups (parquet), unused (csv),
    or shard index / shard count (hub). ``size`` is the bytes it covers, for ETAs.
    """

    kind: str
    path: str
    start: int = 0
    stop: int = 0
    size: int = 0
    split: str = "train"
    revision: str | None = None
