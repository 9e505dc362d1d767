"""Live progress: workers push updates to a tiny Ray actor; the driver draws them.

Ray Train only hands metrics back to the driver when ``fit()`` returns, and fan-out
tasks return nothing until they finish, so workers send fire-and-forget updates
(step, loss, tokens/s, state) to a named zero-CPU actor. The driver polls its snapshot
a few times a second. Losing an update costs a stale number on screen, never a result:
results travel through return values and the run directory.
"""

from __future__ import annotations

import time
from typing import Any

HUB_NAMESPACE = "branchout"


def hub_name(run_id: str) -> str:
    return f"branchout-progress-{run_id}"


def start_hub(run_id: str):
    import ray

    @ray.remote(num_cpus=0)
    class ProgressHub:
        def __init__(self) -> None:
            self.jobs: dict[str, dict[str, Any]] = {}

        def update(self, job: str, fields: dict[str, Any]) -> None:
            self.jobs.setdefault(job, {}).update(fields, updated=time.time())

        def snapshot(self) -> dict[str, dict[str, Any]]:
            return self.jobs

    return ProgressHub.options(name=hub_name(run_id), namespace=HUB_NAMESPACE,
                               get_if_exists=True, lifetime=None).remote()


def connect_hub(name: str | None):
    """The hub actor, or None when there is none (a job run outside a pipeline)."""
    if not name:
        return None
    import ray

    try:
        return ray.get_actor(name, namespace=HUB_NAMESPACE)
    except ValueError:
        return None


def announce(name: str | None, job: str) -> None:
    """Tell the hub (if any) that ``job`` started in this process: its "running" entry."""
    import os
    import socket

    hub = connect_hub(name)
    if hub is not None:
        hub.update.remote(job, {"state": "running", "started": time.time(), "pid": os.getpid(),
                                "node": socket.gethostname()})
