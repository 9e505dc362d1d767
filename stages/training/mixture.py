"""A pretraining mixture (``pretrain.datasets``): several packed corpora read as one, by weight.

Which source the ``k``-th training sample comes from is a pure function of ``k`` and the
weights, as the block order of one corpus is (``stages.training.batches``): a resumed
pretrain reads exactly what an uninterrupted one would have, on any number of workers, and
a weight lives only in the pretrain's settings, never in a source's packed data.

The interleaving is exact at every prefix, not only on average. With weights ``w₁ … wₘ``
(normalised), the first ``N`` samples hold ``c₁(N) = ⌊N·w₁ + ½⌋`` of source 1; of the
``N − c₁(N)`` others, source 2 holds its rounded share ``w₂ / (w₂ + … + wₘ)``, and so on, the
last source taking the rest. Each ``cᵢ`` grows by 0 or 1 per sample and they sum to ``N``, so
sample ``k`` is the one source whose count steps from ``k`` to ``k + 1``, and it is that
source's ``cᵢ(k)``-th sample. Every prefix holds ``N·wᵢ`` of each source to within one block
per level. Each source keeps its own order (its own epochs, shards and windows) and is read
at its own position: an epoch of a source is as many of its samples as it has blocks.
"""

from __future__ import annotations

import numpy as np

from branchout.stages.training.batches import BlockOrder


def source_counts(weights: np.ndarray, n: np.ndarray) -> np.ndarray:
    """``counts[i, j]``: samples of source ``i`` among the first ``n[j]`` (see the module)."""
    n = np.asarray(n, dtype=np.int64)
    counts = np.empty((len(weights), len(n)), np.int64)
    rest = n.copy()
    left = 1.0
    for i, w in enumerate(weights[:-1]):
        share = min(1.0, w / left) if left > 0 else 0.0
        counts[i] = np.floor(rest * share + 0.5).astype(np.int64)
        rest = rest - counts[i]
        left -= w
    counts[-1] = rest
    return counts


class MixtureOrder:
    """The sample order over a mixture: global sample ``k`` → a block id in the mixture's
    concatenated index space (source ``i``'s blocks at ``offsets[i]`` onwards)."""

    sharded = False  # read position by position (ranks take turns), as one shard is

    def __init__(self, sizes: list[int], weights: list[float], seed: int):
        if len(sizes) != len(weights) or min(sizes) < 1:
            raise ValueError("a mixture needs a block count and a weight per source, each source some blocks")
        total = float(sum(weights))
        self.weights = np.asarray(weights, np.float64) / total
        # each source its own order, from its own seed: a source's blocks do not move when another is added
        self.orders = [BlockOrder(n, seed + 7919 * (i + 1)) for i, n in enumerate(sizes)]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)

    def sources(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each sample ``start`` .. ``start + count``, its position in that source's order)."""
        k = np.arange(start, start + count + 1, dtype=np.int64)
        counts = source_counts(self.weights, k)  # (sources, count + 1)
        steps = np.diff(counts, axis=1)  # exactly one 1 per column
        src = np.argmax(steps, axis=0)
        return src, counts[src, np.arange(count)]

    def blocks(self, start: int, count: int) -> np.ndarray:
        """Block ids of samples ``start`` .. ``start + count``."""
        src, pos = self.sources(start, count)
        out = np.empty(count, np.int64)
        for i in np.unique(src):
            mask = src == i
            first = int(pos[mask][0])  # a source's samples in a run are consecutive in its order
            out[mask] = self.offsets[i] + self.orders[i].blocks(first, int(mask.sum()))
        return out


class MixedBlocks:
    """Several packed corpora (``PackedBlocks``, same block length and dtype) as one read-only
    2-D array, indexed by ``MixtureOrder``'s ids."""

    ndim = 2

    def __init__(self, parts: list, weights: list[float]):
        if len({p.shape[1] for p in parts}) != 1:
            raise ValueError("the sources of a mixture must share one block length")
        self.parts, self.weights = parts, list(weights)
        self.sizes = [len(p) for p in parts]
        self.shape = (sum(self.sizes), parts[0].shape[1])
        self.dtype = np.result_type(*(p.dtype for p in parts))
        self._ends = np.cumsum(self.sizes)
        self.read = np.zeros(len(parts), np.int64)  # rows read from each source so far

    def __len__(self) -> int:
        return self.shape[0]

    def order(self, seed: int) -> MixtureOrder:
        return MixtureOrder(self.sizes, self.weights, seed)

    def source_of(self, idx: np.ndarray) -> np.ndarray:
        return np.searchsorted(self._ends, np.asarray(idx), side="right")

    def __getitem__(self, idx) -> np.ndarray:
        idx = np.asarray(idx, np.int64)
        out = np.empty((len(idx), self.shape[1]), self.dtype)
        src = self.source_of(idx)
        self.read += np.bincount(src, minlength=len(self.parts))
        for i in np.unique(src):
            mask = src == i
            out[mask] = self.parts[i][idx[mask] - (self._ends[i] - self.sizes[i])]
        return out


def block_order(blocks, seed: int):
    """The order a training loop reads ``blocks`` in: a mixture's own, or one corpus's."""
    return blocks.order(seed) if isinstance(blocks, MixedBlocks) else BlockOrder(len(blocks), seed)
