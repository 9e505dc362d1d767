"""Storage writes retried with backoff on transient errors.

An object store throttles (503 SlowDown), a connection resets, a request times out: each
is worth another try, and failing a four-hour job on one of them is not. Every write this
package makes (a whole file, an upload, a server-side copy, a delete) goes through
``retrying``: up to ``ATTEMPTS`` tries, ``BASE_DELAY_S`` doubling to ``MAX_DELAY_S`` with
jitter, each retry said on stderr. Errors that another try cannot fix (no such file, no
permission, a full disk) are raised at once. Writes are idempotent (a whole object or file
replaced), and what marks a directory complete (a manifest) is written last, so a retried
write never publishes a partial copy.

``BRANCHOUT_STORAGE_FAULTS=k/n`` (tests, chaos drills): of every ``n`` write attempts in a
process, the first ``k`` fail with a transient error before touching storage.
"""

from __future__ import annotations

import os
import random
import sys
import threading
import time
from collections.abc import Callable
from typing import TypeVar

ATTEMPTS = 6
BASE_DELAY_S = 0.5
MAX_DELAY_S = 10.0
FAULTS_ENV = "BRANCHOUT_STORAGE_FAULTS"

# what an object store's client says when another try may succeed
_TRANSIENT_MARKERS = ("timed out", "timeout", "connection", "reset by peer", "broken pipe", "slowdown",
                      "slow down", "throttl", "temporarily", "try again", "internalerror", "service unavailable",
                      "http status 500", "http status 502", "http status 503", "http status 504")
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)

T = TypeVar("T")
_lock = threading.Lock()
_attempts = 0  # write attempts in this process (fault injection)


class TransientStorageError(ConnectionError):
    """A write failed in a way another try may not (raised by fault injection)."""


def transient(error: BaseException) -> bool:
    if isinstance(error, _PERMANENT):
        return False
    if isinstance(error, ConnectionError | TimeoutError | InterruptedError):
        return True
    if isinstance(error, OSError):
        text = str(error).lower()
        return any(marker in text for marker in _TRANSIENT_MARKERS)
    return False


def retrying(what: str, fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)``, retried on transient errors (see the module)."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            _injected_fault(what)
            return fn(*args, **kwargs)
        except Exception as e:
            if not transient(e) or attempt == ATTEMPTS:
                raise
            delay = min(MAX_DELAY_S, BASE_DELAY_S * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)  # noqa: S311 (jitter)
            print(f"[branchout] storage: {what} failed ({type(e).__name__}: {e}); "
                  f"retry {attempt} of {ATTEMPTS - 1} in {delay:.1f} s", file=sys.stderr, flush=True)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _injected_fault(what: str) -> None:
    spec = os.environ.get(FAULTS_ENV)
    if not spec:
        return
    global _attempts
    k, _, n = spec.partition("/")
    with _lock:
        _attempts += 1
        failing = (_attempts - 1) % int(n) < int(k)
    if failing:
        raise TransientStorageError(f"injected by {FAULTS_ENV}={spec} ({what})")


def reset_faults() -> None:
    """Start the fault count again (tests)."""
    global _attempts
    with _lock:
        _attempts = 0
