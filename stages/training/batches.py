"""Which blocks each worker reads at each step: a pure function of (step, rank, world, seed).

Because the order depends on nothing but these numbers, a resumed run reads exactly
the blocks an uninterrupted one would have read after its checkpoint: the data
position is simply the optimizer step. Every epoch visits every block once (up to
``n_blocks % world`` blocks an epoch when the data spans several shards), in an order
drawn from ``seed + epoch``.

Data in one shard (``stages/prepare/blocks.py``: ``SHARD_BLOCKS`` blocks) is read as one global
permutation, the ranks taking turns through it. Data in several shards is read
shard-aware, as MosaicML Streaming does, so that a worker on object storage fetches only a
few shards per epoch instead of all of them: each epoch the shards are put in a random
order and grouped into windows of ``WINDOW_SHARDS`` shards; blocks are shuffled within a
window; and the sequence is cut into *lanes*, one per micro-batch of a step
(``global_batch / micro``), each a contiguous ``1/lanes`` of it. A rank reads its
``accumulation`` lanes, so it touches about ``shards / world + 2 · accumulation ·
WINDOW_SHARDS`` shards an epoch, and each micro-batch mixes blocks of up to
``WINDOW_SHARDS`` shards (shards hold consecutive documents, so the window is what keeps
a batch from being one region of the corpus).

In both layouts the samples of a step do not depend on the worker count: only which rank
reads which micro-batch does. A job resumed on another number of workers
(``stages.training.reshard``) therefore reads exactly the blocks the uninterrupted job
would have, none skipped or repeated. (Changing ``micro_batch_size`` changes the lanes of
sharded data, and the job's cache key.)
"""

from __future__ import annotations

import numpy as np

from branchout.stages.prepare.blocks import SHARD_BLOCKS

WINDOW_SHARDS = 4


class BlockOrder:
    """Sample order over ``n_blocks`` laid out in shards of ``shard_blocks`` blocks."""

    def __init__(self, n_blocks: int, seed: int, shard_blocks: int = SHARD_BLOCKS,
                 window: int = WINDOW_SHARDS):
        if n_blocks < 1:
            raise ValueError("no blocks to train on")
        self.n = n_blocks
        self.seed = seed
        self.shard_blocks = shard_blocks
        self.window = window
        self.n_shards = -(-n_blocks // shard_blocks)
        self.sharded = self.n_shards > 1
        self._perms: dict[int, np.ndarray] = {}
        self._layouts: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._windows: dict[tuple[int, int], np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perms[epoch]

    def _layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard order, first position of each window) of ``epoch``."""
        if epoch not in self._layouts:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.n_shards)
            sizes = np.minimum(self.shard_blocks, self.n - order * self.shard_blocks)
            per_window = np.add.reduceat(sizes, np.arange(0, self.n_shards, self.window))
            self._layouts = {epoch: (order, np.concatenate([[0], np.cumsum(per_window)]))}
        return self._layouts[epoch]

    def _window_blocks(self, epoch: int, w: int) -> np.ndarray:
        if (epoch, w) not in self._windows:
            order, _ = self._layout(epoch)
            ids = np.concatenate([np.arange(s * self.shard_blocks, min((s + 1) * self.shard_blocks, self.n))
                                  for s in order[w * self.window:(w + 1) * self.window]])
            if len(self._windows) > 4:  # a rank moves through windows in order: keep a few
                self._windows.clear()
            self._windows[(epoch, w)] = ids[np.random.default_rng([self.seed, epoch, w]).permutation(len(ids))]
        return self._windows[(epoch, w)]

    def _at(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        """Blocks at ``positions`` (within ``epoch``) of the shard-windowed sequence."""
        _, starts = self._layout(epoch)
        windows = np.searchsorted(starts, positions, side="right") - 1
        out = np.empty(len(positions), np.int64)
        for w in np.unique(windows):
            mask = windows == w
            out[mask] = self._window_blocks(epoch, int(w))[positions[mask] - starts[w]]
        return out

    def blocks(self, start: int, count: int) -> np.ndarray:
        """Samples ``start`` .. ``start + count`` of the global order."""
        positions = np.arange(start, start + count)
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(positions // self.n):
            mask = positions // self.n == epoch
            within = positions[mask] % self.n
            out[mask] = self._at(int(epoch), within) if self.sharded else self._perm(int(epoch))[within]
        return out

    def rank_blocks(self, rank: int, world: int, start: int, count: int) -> np.ndarray:
        """Samples ``start`` .. of lane ``rank`` of ``world`` lanes: its ``1/world`` of every epoch."""
        span = max(1, self.n // world)
        k = np.arange(start, start + count)
        epochs, within = k // span, (rank * span + k % span) % self.n
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            out[mask] = self._at(int(epoch), within[mask])
        return out


def step_micro_batches(order: BlockOrder, step: int, global_batch: int, micro: int,
                       rank: int, world: int) -> list[np.ndarray]:
    """Block indices of each accumulation micro-batch of ``rank`` at optimizer ``step``."""
    accum = global_batch // (micro * world)
    if order.sharded:  # micro-batch a of this rank is lane a·world + rank, at the step's place in it
        lanes = global_batch // micro
        return [order.rank_blocks(a * world + rank, lanes, step * micro, micro) for a in range(accum)]
    base = step * global_batch
    return [order.blocks(base + (a * world + rank) * micro, micro) for a in range(accum)]


def epochs_for(steps: int, global_batch: int, n_blocks: int) -> float:
    return steps * global_batch / n_blocks
