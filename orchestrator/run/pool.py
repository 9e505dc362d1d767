"""The warm pool: a fixed set of ``stages.training.warm.JobRunner`` actors that take fan-out jobs in turn.

``submit(job)`` returns a future at once; the job starts on the next idle runner. When a
runner's process dies mid-job, the job's future fails with Ray's error (the fan-out's
retry policy then resubmits it) and a new runner starts when a job needs one. A runner
holds its resources (the job's bundle) only while there is work: idle with nothing queued,
it gives them back after a short linger, so jobs of other shapes can be placed.
``shutdown()`` when the fan-out is over. ``FarmSet`` holds the fan-out's adapter farms.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from branchout.stages.job import TrainJob


class WarmPool:
    """Up to ``size`` runners with one resource bundle each, taking queued jobs in turn.

    A runner that finds the queue empty lingers ``linger_s`` (the fan-out submits its next
    job within that) and then gives its resources back. Holding them for the pool's life
    deadlocked fan-outs that mix shapes: single-worker jobs done, their runners idle on both
    CPUs, and a 2-worker fine-tune waiting for those CPUs forever. A later job starts a new
    runner (cold) when none is idle.
    """

    def __init__(self, resources: dict[str, float], size: int, shared_base=None, linger_s: float = 2.0):
        import ray

        from branchout.stages.training.warm import JobRunner

        bundle = dict(resources)
        cpus, gpus = bundle.pop("CPU", 1.0), bundle.pop("GPU", 0.0)
        self._actor_class = ray.remote(JobRunner).options(num_cpus=cpus, num_gpus=gpus, resources=bundle or None,
                                                          max_restarts=0)
        self.shared_base = shared_base  # an ObjectRef of the parent's weights, or None
        self.width = max(1, size)
        self.linger_s = linger_s
        self._lock = threading.Lock()
        # started warm: their imports overlap with the wait for the first jobs
        self._idle: deque = deque(self._actor_class.remote() for _ in range(self.width))
        self._all = list(self._idle)
        # what to start on the next idle runner: actor → ObjectRef of its result
        self._queue: deque[tuple[Callable, cf.Future]] = deque()
        self._closed = False
        # linger timers still pending: cancelled and joined at shutdown. A timer thread holds
        # a runner's handle; one that outlives ray.shutdown() drops it into a core worker that
        # is gone, and Ray then ends the whole driver process with exit code 1 (a run that
        # succeeded reported as a failed Ray job)
        self._timers: set[threading.Timer] = set()
        self.replaced = 0  # runners that died mid-job
        self.retired = 0  # runners that gave their resources back when there was no work

    def submit(self, job: TrainJob) -> cf.Future:
        """Train ``job`` on the next idle runner."""
        return self._enqueue(lambda actor: actor.run.remote(job, self.shared_base, time.time()))

    def submit_call(self, fn: Callable, args: tuple, name: str, hub_name: str | None) -> cf.Future:
        """Run ``fn(*args)`` (an evaluation, announced as ``name``) on the next idle runner."""
        return self._enqueue(lambda actor: actor.call.remote(fn, args, name, hub_name))

    def _enqueue(self, start: Callable) -> cf.Future:
        outer: cf.Future = cf.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("submit to a warm pool that was shut down")
            self._queue.append((start, outer))
        self._dispatch()
        return outer

    def _dispatch(self) -> None:
        with self._lock:
            started = []
            while self._queue and (self._idle or len(self._all) < self.width):
                if not self._idle:
                    actor = self._actor_class.remote()
                    self._all.append(actor)
                    self._idle.append(actor)
                start, outer = self._queue.popleft()
                actor = self._idle.popleft()
                ref = start(actor)
                started.append((actor, ref, outer))
        for actor, ref, outer in started:
            ref.future().add_done_callback(lambda f, a=actor, o=outer: self._finished(a, f, o))

    def _finished(self, actor, inner: cf.Future, outer: cf.Future) -> None:
        from ray.exceptions import RayActorError

        error = inner.exception()
        with self._lock:
            if isinstance(error, RayActorError) and not self._closed:
                self._all.remove(actor)  # its process died; a new runner starts when a job needs one
                self.replaced += 1
            elif not self._closed:
                self._idle.append(actor)
                if not self._queue:
                    timer = threading.Timer(self.linger_s, self._retire)
                    timer.args = (actor, timer)
                    timer.daemon = True
                    self._timers.add(timer)
                    timer.start()
        if error is None:
            outer.set_result(inner.result())
        else:
            outer.set_exception(error)
        self._dispatch()

    def _retire(self, actor, timer: threading.Timer) -> None:
        """Give an idle runner's resources back, unless it took a job in the meantime."""
        import ray

        with self._lock:
            self._timers.discard(timer)
            if self._closed or actor not in self._idle or self._queue:
                return
            self._idle.remove(actor)
            self._all.remove(actor)
            self.retired += 1
        ray.kill(actor)  # outside the lock: see shutdown()

    def shutdown(self) -> None:
        """Release every runner (and its resources); jobs still running are killed with it."""
        import ray

        with self._lock:
            self._closed = True
            actors, self._all = self._all, []
            self._idle.clear()
            queued, self._queue = list(self._queue), deque()
            timers, self._timers = list(self._timers), set()
        for timer in timers:
            timer.cancel()
        for timer in timers:
            timer.join(timeout=30)  # one already in _retire finishes its ray.kill first
        # Outside the lock: a killed runner's future calls back into _finished (on Ray's
        # thread), and ray.kill may wait for that thread.
        for actor in actors:
            ray.kill(actor)
        for _, outer in queued:
            outer.set_exception(RuntimeError("the warm pool was shut down before this job started"))


class PoolSet:
    """One warm pool per distinct job bundle, created when the first of its jobs is submitted
    (by then the stage cache has said which jobs need no run), sized to the jobs left, what
    the cluster holds, and ``max_concurrent``.

    The parent's weights reach the runners through Ray's object store, and the driver
    never holds them: a loader task on a node where the jobs run reads the published base
    and returns its arrays. Ray stores a task's (large) return value in the object store of
    the node that ran it; the driver keeps only the reference, as the object's owner, and
    passes it to the runners, which map it read-only. The driver may run on a small head
    node (it does when submitted as a Ray job): a 7B base in fp32 is 27 GB there otherwise.
    A lost node's copy is rebuilt by Ray re-running the loader (lineage reconstruction).
    """

    def __init__(self, base_uri: str | None, max_concurrent: int | None, fixed_cluster: bool):
        self.base_uri = base_uri
        self.max_concurrent = max_concurrent
        self.fixed_cluster = fixed_cluster
        self.pools: dict[tuple, WarmPool] = {}
        self._bases: dict[str, object] = {}  # dtype → ObjectRef of the weights
        self._lock = threading.Lock()

    def submit(self, job: TrainJob, resources: dict[str, float], jobs_left: int) -> cf.Future:
        return self._pool(resources, jobs_left, job).submit(job)

    def submit_call(self, fn: Callable, args: tuple, name: str, hub_name: str | None,
                    resources: dict[str, float], jobs_left: int) -> cf.Future:
        """An evaluation on the runners its domain's fine-tunes warmed (same bundle), when
        they are still there; on new runners otherwise."""
        return self._pool(resources, jobs_left, None).submit_call(fn, args, name, hub_name)

    def _pool(self, resources: dict[str, float], jobs_left: int, job: TrainJob | None) -> WarmPool:
        key = tuple(sorted(resources.items()))
        with self._lock:
            if key not in self.pools:
                width = max(1, jobs_left)
                if self.max_concurrent:
                    width = min(width, self.max_concurrent)
                if self.fixed_cluster:
                    from branchout.cluster.capacity import slots

                    width = min(width, max(1, slots(resources)))
                base = self._shared_base(resources, job) if job is not None else None
                self.pools[key] = WarmPool(resources, width, base)
            return self.pools[key]

    def _shared_base(self, resources: dict[str, float], job: TrainJob):
        """The parent's weights in the dtype this pool's jobs read them in, loaded once per dtype."""
        from branchout.orchestrator.config.plan import planned_precision

        if not self.base_uri:
            return None
        # the precision the workers will decide, where the driver can know it (the GPU type);
        # fp32 otherwise: a full-width base serves any precision, a 16-bit one of the wrong kind not
        known = planned_precision(job.spec(), embedded=False)
        dtype = shared_base_dtype(resources, known.used if known else "fp32")
        if dtype not in self._bases:
            import ray

            from branchout.cluster.capacity import loader_options
            from branchout.stages.training.model import shared_base_weights

            loader = ray.remote(shared_base_weights).options(**loader_options(resources), name="shared-base")
            self._bases[dtype] = loader.remote(self.base_uri, dtype)  # never ray.get here
        return self._bases[dtype]

    def shutdown(self) -> None:
        for pool in self.pools.values():
            pool.shutdown()
        self._bases.clear()  # the last references: Ray frees the weights


def shared_base_dtype(resources: dict[str, float], precision: str) -> str:
    """What a pool's jobs need the parent in.

    On a GPU a LoRA job keeps the frozen base in the training precision (it is cast there
    anyway) and a full fine-tune makes its own fp32 copy from whatever it gets: 16 bits
    halve the object store and the transfer. On the CPU a LoRA job computes with the
    shared arrays in place, which must then be fp32.
    """
    from branchout.orchestrator.run.ray_train import simulate_gpus

    # simulated GPUs (a fake cluster's scheduling tokens) train on the CPU
    if resources.get("GPU", 0) > 0 and precision in ("bf16", "fp16") and not simulate_gpus():
        return "bfloat16" if precision == "bf16" else "float16"
    return "float32"


class FarmSet:
    """The fan-out's adapter farms (``core.graph.farm_groups``): one ``FarmRunner`` actor per
    farm on one worker's bundle, made when its first member is submitted. Each member is
    submitted as its own call and comes back as its own future."""

    def __init__(self, base_uri: str, tokenizer_uri: str):
        import threading

        self.base_uri, self.tokenizer_uri = base_uri, tokenizer_uri
        self._actors: dict[str, Any] = {}
        self._running: dict[str, int] = {}  # members submitted to each farm and not yet returned
        self._lock = threading.Lock()

    def submit(self, job: TrainJob, farm: str, resources: dict[str, float], members: int) -> cf.Future:
        import threading

        with self._lock:
            actor = self._actor(job, farm, resources, members)
            self._running[farm] = self._running.get(farm, 0) + 1
        future = actor.train.remote(job).future()
        # Ray runs done-callbacks on its own I/O thread, where a ray.kill deadlocks: hand it over
        future.add_done_callback(lambda _: threading.Thread(target=self._returned, args=(farm, actor),
                                                            daemon=True).start())
        return future

    def _returned(self, farm: str, actor) -> None:
        """A member came back. Once a farm's every member has, its actor goes: it holds its
        worker's bundle, which the next farms (or lone jobs) wait for. (Left alive, two finished
        farms held both CPUs of a 2-core machine while 32 members of two more farms waited.)"""
        import ray

        with self._lock:
            self._running[farm] -= 1
            if self._running[farm] or self._actors.get(farm) is not actor:
                return
            del self._actors[farm], self._running[farm]
        ray.kill(actor)

    def _actor(self, job: TrainJob, farm: str, resources: dict[str, float], members: int):
        import ray

        from branchout.stages.training.farm_runner import FarmRunner

        if farm not in self._actors:
            bundle = dict(resources)
            cpus, gpus = bundle.pop("CPU", 1.0), bundle.pop("GPU", 0.0)
            t = job.training
            self._actors[farm] = ray.remote(FarmRunner).options(
                num_cpus=cpus, num_gpus=gpus, resources=bundle or None, max_restarts=0,
                max_concurrency=members + 2,  # a call per member, waiting on the trainer thread
            ).remote(farm, self.base_uri, self.tokenizer_uri, t.deepspeed.precision,
                     t.resources_per_worker.uses_gpu, max(1, int(cpus)), t.lora.target_modules)
        return self._actors[farm]

    def shutdown(self) -> None:
        import ray

        with self._lock:
            actors = list(self._actors.values())
            self._actors.clear()
            self._running.clear()
        for actor in actors:
            ray.kill(actor)
