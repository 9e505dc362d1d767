"""Connect the driver to Ray: an embedded local instance, or an existing cluster.

``cluster.address: null`` starts Ray inside this process's machine (the default, CPU
only unless GPUs are present). Inside a submitted Ray job, ``RAY_ADDRESS`` is set and
the same call joins that cluster instead, so one pipeline file runs unchanged either
way. Worker output goes to Ray's log files, not the terminal: the driver draws its own
progress from the progress hub.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from branchout.core.spec import ClusterSpec


class ClusterError(RuntimeError):
    """Ray could not be started or reached; the message says what to check."""


@dataclass
class ClusterInfo:
    address: str
    embedded: bool
    resources: dict[str, float]
    nodes: int


@contextmanager
def connect(cluster: ClusterSpec) -> Iterator[ClusterInfo]:
    """Start or join Ray for the duration of the block; shuts down only what it started."""
    import ray

    # Ray warns on the driver whenever a task raises an exception type it cannot
    # subclass; the error itself is recorded, so the warning is noise for users.
    logging.getLogger("ray.exceptions").setLevel(logging.ERROR)
    started_here, quieted = False, None
    if not ray.is_initialized():
        address = cluster.address or os.environ.get("RAY_ADDRESS")
        kwargs = dict(log_to_driver=False, logging_level=logging.WARNING, namespace="branchout")
        try:
            if address:
                ray.init(address=address, **kwargs)
            else:
                # "local": always a new instance. With no address Ray would join the
                # cluster of the last `ray start` on this machine, a different cluster
                # (other resources, other token) than the user asked for.
                forget_dead_cluster_address()
                ray.init(address="local", num_cpus=cluster.num_cpus, num_gpus=cluster.num_gpus,
                         include_dashboard=False, **kwargs)
                quieted = _without_preemption_watcher()
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ClusterError(f"cannot connect to Ray at {address or 'a new local instance'}: "
                               f"{str(e).splitlines()[0]}") from None
        started_here = True
    try:
        ctx = ray.get_runtime_context()
        embedded = not (cluster.address or os.environ.get("RAY_ADDRESS"))
        yield ClusterInfo(address=ctx.gcs_address, embedded=embedded,
                          resources=dict(ray.cluster_resources()),
                          nodes=len([n for n in ray.nodes() if n.get("Alive")]))
    finally:
        if started_here:
            _shutdown(timeout=15)
        if quieted is not None:
            os.environ.pop(quieted, None)


PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def _without_preemption_watcher() -> str | None:
    """Turn off Ray Train's preemption watcher for an embedded instance; returns the variable
    set (to unset it afterwards) or None where the user set it.

    The watcher is an actor per Ray Train run that polls the nodes' drain state, so a drained
    node's workers checkpoint and move to the nodes that remain (stages.training.distributed).
    An embedded instance is one node, this machine, with no autoscaler to drain it and no
    other node to move to; the watcher's process start (~1.5 s on 2 CPU cores, measured on
    every pretrain launch: queued → running 14.6-15.6 s with it, 13.6-13.7 s without) buys
    nothing there. Ray Train hands the driver's RAY_TRAIN_* variables to its controller."""
    if PREEMPTION_WATCHER in os.environ:
        return None
    os.environ[PREEMPTION_WATCHER] = "0"
    return PREEMPTION_WATCHER


def forget_dead_cluster_address(record: str | None = None) -> None:
    """Remove Ray's record of "the last `ray start` cluster" (``/tmp/ray/ray_current_cluster``)
    when that cluster is gone, as ``ray stop`` would have.

    A cluster that was killed rather than stopped leaves the record behind, and Ray Train's
    controller reads it: its placement-group cleaner asks the state API of that dead address
    and waits out a 10 s timeout, so every Ray Train run (pretrain, multi-worker fine-tunes)
    took 12 s longer to return after its workers had finished (measured with Ray 2.60: an
    empty two-worker TorchTrainer.fit 26-29 s with the record, 14-16 s without it). A record
    of a live cluster stays: it is the user's. ``record``: the file (Ray's default place if None).
    """
    import socket

    from ray._common.utils import get_ray_address_file

    record = record or get_ray_address_file(None)
    try:
        with open(record) as f:
            host, _, port = f.read().strip().rpartition(":")
        with socket.create_connection((host, int(port)), timeout=1):
            return  # a live GCS
    except FileNotFoundError:
        return
    except (OSError, ValueError):
        pass
    with contextlib.suppress(OSError):
        os.remove(record)


def _shutdown(timeout: float) -> None:
    """``ray.shutdown()``, but never hang the driver's exit on a cluster that is already gone."""
    import threading

    import ray

    done = threading.Thread(target=ray.shutdown, daemon=True)
    done.start()
    done.join(timeout)
