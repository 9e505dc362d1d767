"""Capacity hints: tell Ray's autoscaler what the next stage needs before it asks.

Ray's autoscaler reacts to *pending* tasks, one scheduling round at a time; a fan-out of
32 GPU jobs submitted after pretraining would grow the cluster in steps, minutes late.
``ray.autoscaler.sdk.request_resources(bundles=...)`` is a standing hint the autoscaler
satisfies at once (it replaces the previous hint; an empty list clears it). The driver
uses it at three moments:

1. before the pretrain: the pretrain's workers;
2. when the pretrain enters its last checkpoint interval: pretrain *and* fan-out bundles,
   so fan-out nodes boot while the last steps run;
3. when the pretrain is done: only the fan-out bundles (pretrain nodes may idle out).

Every hint is cleared when the run ends, fails or is stopped. Without an autoscaler
(``cluster.autoscaling: false``, the embedded Ray) the hints are a logged no-op.

Ray 2.60 runs a cluster-wide ``AutoscalingCoordinator`` actor that merges the requests of
Ray Train and Ray Data and re-sends the union every 20 s, overwriting (or clearing) any
request made with ``request_resources`` directly. So hints are registered with that
coordinator as one more requester (``branchout-<run id>``), merged with Ray Train's own
requests, expiring on their own if this driver dies. Its client lives in a private Ray
module; when it is missing, hints fall back to ``request_resources``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from branchout.core.graph import JobGraph, Kind

EXPIRE_S = 1800.0  # a dead driver's hint lapses by itself; live ones are refreshed


@dataclass
class CapacityHints:
    enabled: bool
    log: Callable[[str], None] = print
    requester: str = "branchout"
    on_request: Callable[[str, list[dict[str, float]]], None] | None = None  # e.g. the registry's event log
    history: list[tuple[float, str, list[dict[str, float]]]] = field(default_factory=list)
    _said_noop: bool = False
    _sent: float = 0.0
    _client: object = None  # DefaultAutoscalingCoordinator, False when unavailable

    def request(self, bundles: list[dict[str, float]], reason: str) -> None:
        """Replace the standing hint with ``bundles`` (what the cluster should be able to hold)."""
        self.history.append((time.time(), reason, bundles))
        if self.on_request:
            self.on_request(reason if self.enabled else f"{reason} (not sent: no autoscaler)", bundles)
        if not self.enabled:
            if not self._said_noop:
                self.log("capacity hints: off (no autoscaler, or cluster.request_ahead is false); "
                         "nodes are not requested ahead")
                self._said_noop = True
            return
        self._send(bundles)
        self.log(f"capacity hint: {reason}: {describe(bundles)}")

    def refresh(self) -> None:
        """Re-send the standing hint before it expires (call it from the driver's loop)."""
        if self.enabled and self.history and self.history[-1][2] and time.time() - self._sent > EXPIRE_S / 2:
            self._send(self.history[-1][2])

    def _send(self, bundles: list[dict[str, float]]) -> None:
        self._sent = time.time()
        coordinator = self._coordinator()
        if coordinator is None:
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=bundles)
        elif bundles:
            coordinator.request_resources(bundles, expire_after_s=EXPIRE_S)
        else:
            coordinator.cancel_request()

    def _coordinator(self):
        if self._client is None:
            try:
                from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
                    DefaultAutoscalingCoordinator,
                )
            except ImportError:
                self._client = False
            else:
                self._client = DefaultAutoscalingCoordinator(self.requester)
        return self._client or None

    def clear(self, reason: str = "run ended") -> None:
        if self.history and self.history[-1][2] == []:
            return
        self.request([], reason)


def describe(bundles: list[dict[str, float]]) -> str:
    """``3 × {CPU: 1, GPU: 1} + 2 × {CPU: 1}``"""
    if not bundles:
        return "nothing (cleared)"
    counts: dict[tuple, int] = {}
    for b in bundles:
        key = tuple(sorted(b.items()))
        counts[key] = counts.get(key, 0) + 1
    return " + ".join(f"{n} × {{{', '.join(f'{k}: {v:g}' for k, v in key)}}}" for key, n in counts.items())


def waiting_message(name: str, bundle: dict[str, float], waited_s: float) -> str:
    """Why a queued job has not started: its bundle against every node's free resources."""
    import ray

    free = ray.available_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    fits_somewhere = any(all(n["Resources"].get(k, 0) >= v for k, v in bundle.items()) for n in nodes)
    where = ("busy: nodes that could hold it are in use" if fits_somewhere
             else "no current node can hold it; waiting for the autoscaler to add one")
    short = {k: round(free.get(k, 0.0), 2) for k in bundle}
    return (f"{name}: waiting {waited_s:.0f}s for {{{', '.join(f'{k}: {v:g}' for k, v in bundle.items())}}} "
            f"(free now: {short}); {where}")


def stage_bundles(graph: JobGraph) -> dict[str, list[dict[str, float]]]:
    """The bundles each stage of the pipeline holds at its widest: pretrain, fan-out, evaluate.

    The fan-out runs its jobs in the driver's order (fine-tunes, then baselines) up to
    ``finetune.max_concurrent`` at a time; an adapter farm holds one bundle for all its
    members. An evaluation runs on one worker of its domain's
    fine-tune bundle (GPU share and accelerator type included), so its nodes are the fan-out's kind.
    """
    out = {}
    for stage in ("pretrain", "fanout", "evaluate"):
        nodes = graph.of(*(k for k in Kind if k.stage == stage))  # kind by kind: fine-tunes first
        if stage == "fanout":
            nodes = nodes[:graph.spec.finetune.max_concurrent or len(nodes)]
            # an adapter farm's members share its one bundle
            nodes = [n for i, n in enumerate(nodes) if not n.farm or n.farm not in {m.farm for m in nodes[:i]}]
        out[stage] = [b for n in nodes for b in n.bundles]
    return out
