"""A SIGTERM to a training worker checkpoints the step it is at before the process goes.

Who sends it: a node agent relaying a spot notice, `kill`, a container runtime stopping a
process. Ray's own handler ends a worker process on SIGTERM at once (``SystemExit`` in its
main thread), and the steps since the job's last checkpoint would be trained again.

Ray Train starts its worker processes with ``worker_process_setup_hook`` =
``install`` (``orchestrator.run.ray_train``), which runs in the worker's main thread before
Ray registers its handler, and wraps that registration: while a training loop runs in the
process (``training``), a SIGTERM only raises a flag (``requested``). The loop asks for it on
every report step together with the node-drain notice, all ranks agreeing
(``stages.training.recipe.notice``): the step is checkpointed and the attempt ends as a
preempted one, which the launcher starts again at once; the process then goes the way Ray
goes (Ray Train ends its workers after the run). A loop that does not reach a report step
within ``GRACE_S`` gets Ray's handler after all. Outside a training loop a SIGTERM is Ray's.
"""

from __future__ import annotations

import _thread
import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

GRACE_S = 30.0  # a SIGTERM's sender (a pod's grace period, a spot notice) gives this much at least

_requested = threading.Event()
_active = threading.Event()
_original = None  # the handler Ray (or nobody) registered; called when the flag is not enough


def install() -> None:
    """``worker_process_setup_hook``: have Ray's SIGTERM handler registered through ours."""
    import ray._private.utils as ray_utils

    register = ray_utils.set_sigterm_handler

    def through_ours(handler) -> None:
        global _original
        _original = handler
        register(_on_sigterm)

    ray_utils.set_sigterm_handler = through_ours


def _on_sigterm(signum, frame) -> None:
    if _active.is_set() and not _requested.is_set():
        _requested.set()
        print(f"[branchout] SIGTERM: this training worker checkpoints at its next logged step (within {GRACE_S:.0f} s), "
              "then goes", flush=True)
        timer = threading.Timer(GRACE_S, _thread.interrupt_main, args=(signal.SIGTERM,))
        timer.daemon = True
        timer.start()
        return
    if _original is not None:
        _original(signum, frame)
    else:
        sys.exit(128 + signum)


def requested() -> bool:
    """Whether this process was sent SIGTERM while it trains."""
    return _requested.is_set()


@contextlib.contextmanager
def training() -> Iterator[None]:
    """A training loop runs in this process: a SIGTERM waits for its next checkpoint."""
    _active.set()
    try:
        yield
    finally:
        _active.clear()
