"""The warm pool: a fixed set of ``stages.warm.JobRunner`` actors that take fan-out jobs in turn.

``submit(job)`` returns a future at once; the job starts on the next idle runner. When a
runner's process dies mid-job, the job's future fails with Ray's error (the fan-out's
retry policy then resubmits it) and the runner is replaced by a fresh one, so the pool
keeps its width. Runners hold their resources (the job's bundle) for the pool's life:
``shutdown()`` when the fan-out is over.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from collections import deque

from branchout.stages.job import TrainJob


class WarmPool:
    def __init__(self, resources: dict[str, float], size: int, shared_base=None):
        import ray

        from branchout.stages.warm import JobRunner

        bundle = dict(resources)
        cpus, gpus = bundle.pop("CPU", 1.0), bundle.pop("GPU", 0.0)
        self._actor_class = ray.remote(JobRunner).options(num_cpus=cpus, num_gpus=gpus, resources=bundle or None,
                                                          max_restarts=0)
        self.shared_base = shared_base  # an ObjectRef of the parent's weights, or None
        self._lock = threading.Lock()
        self._idle: deque = deque(self._actor_class.remote() for _ in range(max(1, size)))
        self._all = list(self._idle)
        self._queue: deque[tuple[TrainJob, cf.Future]] = deque()
        self._closed = False
        self.replaced = 0

    def submit(self, job: TrainJob) -> cf.Future:
        outer: cf.Future = cf.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("submit to a warm pool that was shut down")
            self._queue.append((job, outer))
        self._dispatch()
        return outer

    def _dispatch(self) -> None:
        with self._lock:
            started = []
            while self._queue and self._idle:
                job, outer = self._queue.popleft()
                actor = self._idle.popleft()
                ref = actor.run.remote(job, self.shared_base, time.time())
                started.append((actor, ref, outer))
        for actor, ref, outer in started:
            ref.future().add_done_callback(lambda f, a=actor, o=outer: self._finished(a, f, o))

    def _finished(self, actor, inner: cf.Future, outer: cf.Future) -> None:
        from ray.exceptions import RayActorError

        error = inner.exception()
        with self._lock:
            if self._closed:
                actor = None  # killed by shutdown(): nothing to replace or reuse
            elif isinstance(error, RayActorError):
                actor = self._actor_class.remote()  # the process died: a fresh runner takes its place
                self.replaced += 1
                self._all.append(actor)
            if actor is not None:
                self._idle.append(actor)
        if error is None:
            outer.set_result(inner.result())
        else:
            outer.set_exception(error)
        self._dispatch()

    def shutdown(self) -> None:
        """Release every runner (and its resources); jobs still running are killed with it."""
        import ray

        with self._lock:
            self._closed = True
            actors, self._all = self._all, []
            self._idle.clear()
            queued, self._queue = list(self._queue), deque()
        # Outside the lock: a killed runner's future calls back into _finished (on Ray's
        # thread), and ray.kill may wait for that thread.
        for actor in actors:
            ray.kill(actor)
        for _, outer in queued:
            outer.set_exception(RuntimeError("the warm pool was shut down before this job started"))


class PoolSet:
    """One warm pool per distinct job bundle, created when the first of its jobs is submitted
    (by then the stage cache has said which jobs need no run), sized to the jobs left, what
    the cluster holds, and ``max_concurrent``."""

    def __init__(self, base_uri: str | None, max_concurrent: int | None, fixed_cluster: bool):
        self.base_uri = base_uri
        self.max_concurrent = max_concurrent
        self.fixed_cluster = fixed_cluster
        self.pools: dict[tuple, WarmPool] = {}
        self._base_ref = None
        self._lock = threading.Lock()

    def submit(self, job: TrainJob, resources: dict[str, float], jobs_left: int) -> cf.Future:
        key = tuple(sorted(resources.items()))
        with self._lock:
            if key not in self.pools:
                width = max(1, jobs_left)
                if self.max_concurrent:
                    width = min(width, self.max_concurrent)
                if self.fixed_cluster:
                    from branchout.cluster.capacity import slots

                    width = min(width, max(1, slots(resources)))
                self.pools[key] = WarmPool(resources, width, self._shared_base())
        return self.pools[key].submit(job)

    def _shared_base(self):
        """The parent's weights, put in the object store once for every job and node."""
        if self._base_ref is None and self.base_uri:
            import ray

            from branchout.stages.model import shared_base_weights

            self._base_ref = ray.put(shared_base_weights(self.base_uri))
        return self._base_ref

    def shutdown(self) -> None:
        for pool in self.pools.values():
            pool.shutdown()
