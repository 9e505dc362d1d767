"""How much more pretraining helps each domain, forecast from probe fine-tunes (``pretrain.probes``).

At each probe point the pretrain's workers fine-tune every domain briefly from the current
weights (``stages.training.probes``); the probe's held-out loss, as a function of the
pretraining tokens ``T`` seen so far, is fit per domain with a saturating law

    loss(T) = E + A · T^(-α)        E ≥ 0, A ≥ 0, α > 0

(E: the loss more pretraining cannot remove; the rest decays as a power of the tokens).
The fit is a grid over α (then a finer one around the best) with, for each α, the
least-squares E and A (linear in them), constrained to be non-negative: no optimiser to
diverge, the same answer every time.

The law holds only where the curve is in its regime. ``E + A·T^-α`` falls ever more slowly
per doubling of T (its slope in log T shrinks), so the points before the curve's steepest fall
per doubling are not on any such law: they are the transient, where the probe's own fine-tune
sets the loss (a checkpoint too early for pretraining to show) and the pretrain has only begun
to fall. ``forecast`` fits the points from the start of that steepest fall on (``regime``);
fit through the transient, the law bends to it and mistakes the onset for the tail (the
quickstart's probes: a first-half fit that passed through steps 25-100 forecast α ~0.1 and
gains that never came, and the 4× budget's stop waited for the plateau rule alone).

A forecast says "no forecast" rather than guess when the fit cannot be trusted: fewer than
``MIN_POINTS`` probe points in the law's regime (a curve whose steepest fall is still among its
latest points has not reached it), a fit that explains too little of the variance (R² below
``MIN_R2``), an α at the low edge of its grid (a curve straight on log axes: the law cannot
tell where it flattens, if ever), or a
bootstrap interval of the final loss wider than ``MAX_SPREAD`` of it. The interval resamples
the residuals (``BOOTSTRAP`` rounds, seeded).

``stop_decision`` is ``pretrain.stop: {when: saturated}``: stop once every domain is
saturated, weighted per domain where weights are given. A domain is saturated when either

- its forecast gain of the remaining budget (relative: the loss now over the loss at the end
  of the budget, minus one) is below ``epsilon`` at ``patience`` probe points in a row, or
- its probes have stopped getting better: the best probe loss so far improved over the last
  ``patience`` points by so little that, carried on at that rate to the end of the budget, it
  would gain less than ``epsilon``. On a saturating (convex, falling) curve the recent rate
  overstates what is left, so this errs towards going on; a curve that has turned back up
  (the pretrain now overfits its corpus or overtrains for the domains) gains nothing at all.
  A saturating law cannot describe such a curve ("no forecast"), and without this the rule
  would never stop the very pretrain it exists for (benchmarks/stop_rule.py: probe losses
  fell until ~step 800 of 1,600 and rose after, and the fit-only rule never fired).

A domain with neither (no forecast and probes still improving) never lets the pretrain stop.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

MIN_POINTS = 4  # in the law's regime: three points fit a three-parameter law exactly, and say nothing of it
MIN_R2 = 0.9
MAX_SPREAD = 0.1
BOOTSTRAP = 200
ALPHAS = np.geomspace(0.02, 3.0, 400)


@dataclass(frozen=True)
class Fit:
    E: float
    A: float
    alpha: float
    r2: float

    def loss(self, tokens) -> np.ndarray:
        return self.E + self.A * np.power(np.asarray(tokens, np.float64), -self.alpha)


def fit_saturating(tokens, losses) -> Fit:
    """The least-squares ``E + A·T^-α`` with E, A ≥ 0: over the α grid, then a finer grid
    between the best α's neighbours."""
    t = np.asarray(tokens, np.float64)
    y = np.asarray(losses, np.float64)
    if len(t) < 2 or np.any(t <= 0):
        raise ValueError("a fit needs two or more probe points at positive token counts")
    scale = t.max()  # T / T_max keeps T^-α in a sane range for every α
    sse, E, A = _solve(t / scale, y, ALPHAS)
    i = int(np.argmin(sse))
    if 0 < i < len(ALPHAS) - 1:
        fine = np.linspace(ALPHAS[i - 1], ALPHAS[i + 1], 201)
        f_sse, f_E, f_A = _solve(t / scale, y, fine)
        j = int(np.argmin(f_sse))
        alpha, best, E_, A_ = fine[j], f_sse[j], f_E[j], f_A[j]
    else:  # at the grid's edge: kept there (forecast() says what it means)
        alpha, best, E_, A_ = ALPHAS[i], sse[i], E[i], A[i]
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(best) / total if total > 0 else (1.0 if best == 0 else 0.0)
    return Fit(E=float(E_), A=float(A_ * scale ** alpha), alpha=float(alpha), r2=r2)


def _solve(t: np.ndarray, y: np.ndarray, alphas: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(SSE, E, A) for each α: the two-parameter normal equations, or, where they leave E or
    A negative, the better fit with one of them at 0."""
    x = np.power(t, -alphas[:, None])  # (alphas, points)
    n, sx, sxx, sy, sxy = len(t), x.sum(1), (x * x).sum(1), y.sum(), x @ y
    det = n * sxx - sx * sx
    with np.errstate(divide="ignore", invalid="ignore"):
        A = np.where(det > 1e-12 * n * sxx, (n * sxy - sx * sy) / det, 0.0)
    E = (sy - A * sx) / n
    A_only = np.maximum(0.0, sxy / sxx)
    bad = (E < 0) | (A < 0)
    sse_free = ((E[:, None] + A[:, None] * x - y) ** 2).sum(1)
    sse_a = ((A_only[:, None] * x - y) ** 2).sum(1)  # E = 0
    mean = max(0.0, float(y.mean()))
    sse_e = float(((y - mean) ** 2).sum())  # A = 0
    use_a = bad & (sse_a <= sse_e)
    use_e = bad & ~use_a
    E = np.where(use_a, 0.0, np.where(use_e, mean, E))
    A = np.where(use_a, A_only, np.where(use_e, 0.0, A))
    return np.where(use_a, sse_a, np.where(use_e, sse_e, sse_free)), E, A


@dataclass
class Forecast:
    """One domain's forecast at ``budget`` tokens, from its probe points so far."""

    tokens: list[int]
    losses: list[float]
    budget: int
    verdict: str  # "forecast" or "no forecast"
    why: str = ""
    E: float | None = None
    A: float | None = None
    alpha: float | None = None
    r2: float | None = None
    final_loss: float | None = None  # the fit at the budget
    fitted_from: int | None = None  # the first token count of the law's regime: the points fit
    interval: list[float] = field(default_factory=list)  # bootstrap 5th-95th percentile of final_loss

    @property
    def ok(self) -> bool:
        return self.verdict == "forecast"

    def gain(self, now_tokens: int) -> float | None:
        """Forecast relative gain of training from ``now_tokens`` to the budget."""
        if not self.ok:
            return None
        now = self.E + self.A * now_tokens ** -self.alpha
        return now / self.final_loss - 1.0

    def as_dict(self) -> dict:
        return asdict(self)


def forecast(tokens: list[int], losses: list[float], budget: int, seed: int = 0) -> Forecast:
    """The domain's probe losses at ``tokens`` fit and carried to ``budget`` tokens."""
    out = Forecast(tokens=[int(t) for t in tokens], losses=[float(v) for v in losses], budget=int(budget),
                   verdict="no forecast")
    finite = [(t, v) for t, v in zip(tokens, losses, strict=True) if math.isfinite(v)]
    if len(finite) < MIN_POINTS:
        out.why = f"{len(finite)} probe point(s); a forecast needs {MIN_POINTS}"
        return out
    t, y = (np.array(c, np.float64) for c in zip(*finite, strict=True))
    first = regime(t, y)
    out.fitted_from = int(t[first])
    if len(t) - first < MIN_POINTS:
        out.why = (f"the curve's steepest fall is still among its latest points (from {out.fitted_from:,} tokens): "
                   f"{len(t) - first} point(s) in the law's regime; a forecast needs {MIN_POINTS}")
        return out
    t, y = t[first:], y[first:]
    fit = fit_saturating(t, y)
    out.E, out.A, out.alpha, out.r2 = fit.E, fit.A, fit.alpha, fit.r2
    out.final_loss = float(fit.loss(budget))
    rng = np.random.default_rng(seed)
    residuals = y - fit.loss(t)
    finals = []
    for _ in range(BOOTSTRAP):
        sample = fit.loss(t) + rng.choice(residuals, size=len(residuals), replace=True)
        finals.append(float(fit_saturating(t, sample).loss(budget)))
    lo, hi = np.percentile(finals, [5, 95])
    out.interval = [float(lo), float(hi)]
    if fit.r2 < MIN_R2:
        out.why = f"the law explains too little of the curve (R² {fit.r2:.2f} < {MIN_R2})"
    elif fit.alpha == ALPHAS[0]:
        # the high edge is a curve that has flattened within its points: the law at the budget is
        # its floor E, which the fit saw; the low edge never flattens in sight
        out.why = f"α at the low edge of its range ({fit.alpha:.3g}): no sign yet of where the curve flattens"
    elif (hi - lo) > MAX_SPREAD * out.final_loss:
        out.why = f"the interval of the final loss is too wide ({lo:.3f}-{hi:.3f})"
    else:
        out.verdict = "forecast"
    return out


def regime(tokens: np.ndarray, losses: np.ndarray) -> int:
    """The index of the first point in the saturating law's regime: the point from which the
    curve falls most per doubling of tokens (0 for a curve that falls most at its start, as the
    law does). Each fall is measured to the first point at least half a doubling later: closely
    spaced late points (probes every N steps) would otherwise let one noisy pair pose as the
    steepest fall. See the module's docstring."""
    log_t = np.log2(np.asarray(tokens, np.float64))
    y = np.asarray(losses, np.float64)
    steepest, start = 0.0, 0
    for i in range(len(log_t)):
        j = int(np.searchsorted(log_t, log_t[i] + 0.5 - 1e-9))
        if j >= len(log_t):  # no point half a doubling on: too late to judge
            break
        fall = (y[j] - y[i]) / (log_t[j] - log_t[i])
        if fall < steepest:
            steepest, start = fall, i
    return start


def forecast_history(points: list[int], losses: dict[str, list[float]], tokens_per_step: int,
                     budget: int, memo: dict | None = None) -> tuple[list[dict[str, Forecast]], list[int]]:
    """The forecasts as they were after each probe point (domain → Forecast), and the tokens
    at each: what ``stop_decision`` reads. ``losses``: each domain's probe loss at every point.

    ``memo``: forecasts made before (a forecast is a pure function of its points, the
    bootstrap seeded), kept by a caller that asks again at every probe point: each asks
    then only for the newest prefix, not all of them again."""
    memo = {} if memo is None else memo
    tokens = [p * tokens_per_step for p in points]

    def made(domain: str, n: int) -> Forecast:
        # repr: a NaN (a failed probe) is never == itself, its repr is
        key = (domain, budget, tuple(tokens[:n]), tuple(map(repr, losses[domain][:n])))
        if key not in memo:
            memo[key] = forecast(tokens[:n], losses[domain][:n], budget)
        return memo[key]

    history = [{d: made(d, n) for d in losses} for n in range(1, len(points) + 1)]
    return history, tokens


def stop_decision(history: list[dict[str, Forecast]], now_tokens: list[int], epsilon: float,
                  weights: dict[str, float] | None = None, patience: int = 2) -> tuple[bool, str]:
    """``pretrain.stop``: (stop?, why). ``history``: the forecasts after each probe point so
    far (domain → Forecast), ``now_tokens`` the tokens at each. A domain's gain is weighted
    by ``weights[domain]`` (default 1) before it is compared with ``epsilon``."""
    weights = weights or {}
    if not history:
        return False, "no probe point yet"
    saturated = []
    for domain, latest in history[-1].items():
        if latest.losses and not math.isfinite(latest.losses[-1]):
            # a failed probe adds no evidence: the forecast repeats the one before, and patience
            # counts points that saw the curve
            return False, f"{domain}: its probe at this point failed"
        weight = weights.get(domain, 1.0)
        held = _forecast_holds(history, now_tokens, domain, epsilon, weight, patience)
        if held is None:
            saturated.append(f"{domain}: forecast gain < {epsilon:.2%} at {patience} probe points in a row")
            continue
        flat = _plateau(latest, patience, epsilon, weight)
        if flat is None:
            probed = sum(math.isfinite(v) for v in latest.losses)
            return False, held + ("; its best probe still improves" if probed > patience else "")
        saturated.append(f"{domain}: {flat}")
    return True, "every domain saturated: " + "; ".join(saturated)


def _forecast_holds(history, now_tokens, domain: str, epsilon: float, weight: float, patience: int) -> str | None:
    """None where ``domain``'s forecast gain (weighted) was below epsilon at the last
    ``patience`` points; otherwise why not."""
    if len(history) < patience:
        return f"{domain}: {len(history)} probe point(s) of the {patience} in a row it takes"
    for forecasts, now in zip(history[-patience:], now_tokens[-patience:], strict=True):
        f = forecasts[domain]
        gain = f.gain(now)
        if gain is None:
            return f"{domain}: no forecast ({f.why})"
        if gain * weight >= epsilon:
            return f"{domain}: forecast gain {gain:.2%} of the remaining budget ≥ epsilon {epsilon:.2%}"
    return None


def _plateau(f: Forecast, patience: int, epsilon: float, weight: float) -> str | None:
    """Why ``f``'s domain has stopped improving (see the module's docstring), or None.
    ``stop_decision`` asks only where the latest probe ran."""
    points = [(t, v) for t, v in zip(f.tokens, f.losses, strict=True) if math.isfinite(v)]
    if len(points) <= patience:
        return None
    best_then = min(v for _, v in points[:-patience])
    best_now = min(v for _, v in points)
    span = points[-1][0] - points[-1 - patience][0]
    left = max(0, f.budget - points[-1][0])
    rate = best_then / best_now - 1.0  # ≥ 0: the best so far only goes down
    carried = rate * left / span if span > 0 else math.inf
    if carried * weight >= epsilon:
        return None
    if rate == 0:
        return f"no better probe in the last {patience} points (best {best_now:.4g})"
    return f"best probe improved {rate:.2%} over the last {patience} points: ~{carried:.2%} left at that rate"
