"""Held-out loss while a model trains (``eval_every``), and what a fine-tune does with it.

``HeldoutScorer`` scores a fixed sample of held-out blocks on the training workers
themselves: no second copy of the model, no other process. The sample is ``eval_blocks``
blocks spread evenly over the held-out set, the same at every scoring, so the curve moves
only because the model does. Each rank scores its own slice of it, as many batches as
every other rank (under ZeRO-3 each forward is a collective), and one all-reduce on the
engine's device (NCCL-valid) sums ``[Σ token loss, tokens]``: the loss is the held-out mean
token loss, the log of its perplexity.

``Selection`` keeps what a fine-tune learns from the scores across restarts (it travels
in every checkpoint's client state): the best step and loss, and how many scorings since.
With ``keep_best`` the best step's weights are checkpointed when scored and exported at the
end; with ``early_stop`` training ends after ``patience`` scorings without a new best.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


class HeldoutScorer:
    """Held-out loss of fixed samples of one or more held-out sets (a mixture: one per source)."""

    def __init__(self, sets: dict[str, tuple], weights: dict[str, float], eval_blocks: int, micro: int,
                 rank: int, world: int):
        """``sets``: name → (held-out blocks, their roles or None); ``weights``: name → its share of
        the overall ``eval_loss`` (a mixture's weights; one set: 1)."""
        self.weights = weights
        self.rank, self.world, self.micro = rank, world, micro
        self.samples = {name: (blocks, roles, self._slice(len(blocks), eval_blocks))
                        for name, (blocks, roles) in sets.items()}

    def _slice(self, n: int, eval_blocks: int) -> np.ndarray:
        """This rank's blocks of the set's sample: ``eval_blocks`` spread over ``n`` (whole
        multiples of the world, repeating blocks when there are fewer than workers)."""
        per_rank = max(1, min(eval_blocks, n) // self.world)
        sample = np.linspace(0, n - 1, per_rank * self.world).round().astype(np.int64) if n else np.zeros(0, np.int64)
        return sample[self.rank::self.world]

    def __call__(self, engine) -> dict[str, float]:
        """``{"eval_loss": …}`` (a mixture adds ``eval_loss/<set>`` per source, ``eval_loss``
        being their weighted mean). Every rank must call it at the same step."""
        import torch
        import torch.distributed as dist

        out = {}
        for name, (blocks, roles, idx) in self.samples.items():
            batches = []
            for start in range(0, len(idx), self.micro):
                rows = np.sort(idx[start:start + self.micro])
                ids = torch.from_numpy(blocks[rows].astype(np.int64))
                batches.append(ids if roles is None else (ids, torch.from_numpy(roles[rows].astype(np.int64))))
            total = engine.score(batches)
            if self.world > 1 and dist.is_initialized():
                dist.all_reduce(total)
            loss_sum, tokens = total.tolist()
            out[name] = loss_sum / tokens if tokens else math.nan
        if len(out) == 1:
            return {"eval_loss": next(iter(out.values()))}
        return {"eval_loss": sum(self.weights[n] * v for n, v in out.items()),
                **{f"eval_loss/{n}": v for n, v in out.items()}}


@dataclass
class Selection:
    """The best held-out loss so far and what follows from it (``keep_best``, ``early_stop``)."""

    keep_best: bool = False
    patience: int | None = None
    min_delta: float = 0.0
    best_step: int | None = None
    best_loss: float = math.inf
    since_best: int = 0  # scorings since the best
    stopped_at: int | None = None

    @classmethod
    def of(cls, t) -> Selection:
        stop = getattr(t, "early_stop", None)
        return cls(keep_best=bool(getattr(t, "keep_best", False)), patience=stop.patience if stop else None,
                   min_delta=stop.min_delta if stop else 0.0)

    def observe(self, step: int, loss: float) -> bool:
        """Record a scoring; True when it is a new best (a NaN never is)."""
        if math.isfinite(loss) and loss < self.best_loss - self.min_delta:
            self.best_step, self.best_loss, self.since_best = step, loss, 0
            return True
        self.since_best += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.since_best >= self.patience

    def state(self) -> dict:
        """What a checkpoint carries (numbers only: ``weights_only`` loadable)."""
        return {k: v for k, v in asdict(self).items() if k in ("best_step", "best_loss", "since_best")}

    def load(self, state: dict | None) -> None:
        for key, value in (state or {}).items():
            setattr(self, key, value)

    def outputs(self) -> dict:
        """What the job's result says about it."""
        out = {"best_step": self.best_step, "best_eval_loss": self.best_loss if self.best_step is not None else None}
        if self.stopped_at is not None:
            out["stopped_early_at"] = self.stopped_at
        return out
