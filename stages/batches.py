"""Which blocks each worker reads at each step: a pure function of (step, rank, seed).

Because the order depends on nothing but these numbers, a resumed run reads exactly
the blocks an uninterrupted one would have read after its checkpoint: the data
position is simply the optimizer step. Every epoch visits every block once, in an
order drawn from ``seed + epoch``.
"""

from __future__ import annotations

import numpy as np


class BlockOrder:
    """Global sample order over ``n_blocks``; sample ``p`` is block ``perm[p // n][p % n]``."""

    def __init__(self, n_blocks: int, seed: int):
        if n_blocks < 1:
            raise ValueError("no blocks to train on")
        self.n = n_blocks
        self.seed = seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perms[epoch]

    def blocks(self, start: int, count: int) -> np.ndarray:
        positions = np.arange(start, start + count)
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(positions // self.n):
            mask = positions // self.n == epoch
            out[mask] = self._perm(int(epoch))[positions[mask] % self.n]
        return out


def step_micro_batches(order: BlockOrder, step: int, global_batch: int, micro: int,
                       rank: int, world: int) -> list[np.ndarray]:
    """Block indices of each accumulation micro-batch of ``rank`` at optimizer ``step``."""
    accum = global_batch // (micro * world)
    base = step * global_batch
    return [order.blocks(base + (a * world + rank) * micro, micro) for a in range(accum)]


def epochs_for(steps: int, global_batch: int, n_blocks: int) -> float:
    return steps * global_batch / n_blocks
