"""The adapter farm as a Ray actor: each member domain arrives as its own ``train`` call.

The driver creates one ``FarmRunner`` per farm (``core.graph.farm_groups``) on one
worker's bundle and calls ``train(job)`` once per member, concurrently (a threaded actor);
each call returns that job's result, or raises that job's error, exactly as a lone
fine-tune's task would, so the fan-out records, retries and caches every member as its own
job. One trainer thread owns the farm: it admits members between steps (a member that
arrives late joins the next step), steps all of them together, and for each member logs
its progress, writes its checkpoints (``checkpoints.Checkpoints``, the lone layout: a member's
checkpoint resumes alone and a lone job's in a farm), and exports its adapter when it
is done.

A member whose loss is not finite is taken out at once, without costing the others a
step, and its call raises ``FarmEvictedError``: the driver retries it alone from its newest
checkpoint (``max_retries``). A farm that dies (a killed process) fails every member's
call; each is retried the same way.
"""

from __future__ import annotations

import json
import math
import os
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from branchout.stages.job import TrainJob


class FarmEvictedError(RuntimeError):
    """A member was taken out of its farm (non-finite loss); it is retried alone."""


@dataclass
class _Waiter:
    job: TrainJob
    done: threading.Event = field(default_factory=threading.Event)
    result: dict | None = None
    error: BaseException | None = None


@dataclass
class _Run:
    """What the trainer thread keeps for one member between steps."""

    waiter: _Waiter
    member: Any  # farm.Member
    logger: Any
    sink: Any  # checkpoints.Checkpoints
    engine: Any  # _MemberEngine
    after_step: Any
    poison: Any
    first_step: int
    started: float
    window: float
    window_steps: int = 0
    first_step_at: float | None = None
    loss: float = float("nan")


class FarmRunner:
    """One farm: the base (loaded once), its members' adapters, a trainer thread."""

    def __init__(self, name: str, base_uri: str, tokenizer_uri: str, precision: str, use_gpu: bool,
                 threads: int, targets: list[str] | None):
        import torch

        from branchout.core.precision import decide, this_worker
        from branchout.stages.prepare.tokenizer import load_tokenizer
        from branchout.stages.training.farm import Farm
        from branchout.storage.checkpoint import fetch_verified

        torch.set_num_threads(max(1, threads))
        self.name = name
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.precision = decide(precision, this_worker(device == "cuda"))  # `auto` decided here, for every member
        from branchout.stages.training.model import default_lora_targets, load_causal_lm

        model = load_causal_lm(fetch_verified(base_uri), dtype=torch.float32)

        # the members' LoRA targets (they share them), else peft's default for this architecture
        self.targets = targets or default_lora_targets(model.config.model_type)
        # on a CPU a member per forward: as fast as one big forward there and a fraction of its
        # memory (benchmarks/farm.py); a GPU takes every member's rows in one forward
        self.farm = Farm(model, self.targets, device, self.precision.used,
                         rows_per_forward=None if device == "cuda" else 1)
        self.tokenizer = load_tokenizer(fetch_verified(tokenizer_uri))
        self._arrivals: queue.Queue[_Waiter] = queue.Queue()
        self._trainer: threading.Thread | None = None
        self._lock = threading.Lock()

    def ready(self) -> int:
        return os.getpid()

    def train(self, job: TrainJob) -> dict:
        """Train ``job`` as a member of this farm; returns its result (as ``recipe.train`` does)."""
        from branchout.core.progress import announce

        announce(job.hub_name, job.name)
        waiter = _Waiter(job)
        self._arrivals.put(waiter)
        with self._lock:
            if self._trainer is None:
                self._trainer = threading.Thread(target=self._loop, name=f"{self.name}-trainer", daemon=True)
                self._trainer.start()
        waiter.done.wait()
        if waiter.error is not None:
            raise waiter.error
        return waiter.result

    # ---- the trainer thread -------------------------------------------------------------

    def _loop(self) -> None:
        runs: dict[str, _Run] = {}
        while True:
            block = not runs
            while True:  # admit whoever arrived, between steps
                try:
                    waiter = self._arrivals.get(block=block, timeout=1.0 if block else None)
                except queue.Empty:
                    break
                block = False
                self._admit(waiter, runs)
            if not runs:
                with self._lock:  # decided under the lock `train` starts a trainer under: no call is left waiting
                    if self._arrivals.empty():
                        self._trainer = None  # the next call starts a new trainer thread
                        return
                continue
            for name, run in runs.items():  # planned faults (stages.training.faults), tests only
                if run.poison is not None and run.poison(run.member.step + 1):
                    self.farm.poison(name)
            try:
                losses = self.farm.step()
            except BaseException as e:  # the farm itself failed: every member's attempt did
                for name in list(runs):
                    self._finish(runs.pop(name), error=e)
                continue  # and whoever arrives next starts afresh
            for name, loss in losses.items():
                run = runs[name]
                try:
                    if not math.isfinite(loss):
                        self._finish(runs.pop(name), error=FarmEvictedError(
                            f"{name}: loss {loss} at step {run.member.step + 1}; taken out of {self.name}, "
                            "to be retried alone from its newest checkpoint"))
                        continue
                    self._after_step(run, loss)
                    if run.member.done:
                        self._finish(runs.pop(name))
                except BaseException as e:  # this member's checkpoint, log or export failed: only its attempt
                    self._finish(runs.pop(name), error=e)

    def _admit(self, waiter: _Waiter, runs: dict[str, _Run]) -> None:
        from branchout.stages.prepare.data import open_blocks
        from branchout.stages.prepare.instruct import open_roles
        from branchout.stages.training.checkpoints import Checkpoints
        from branchout.stages.training.farm import Member
        from branchout.stages.training.faults import killer, poisoner
        from branchout.stages.training.metrics import MetricsLogger

        job = waiter.job
        try:
            started = time.time()
            t = job.training
            member = Member(job.name, t, open_blocks(job.data_uri, "train"), open_roles(job.data_uri, "train"))
            self.farm.add(member)
            logger = MetricsLogger(job.name, job.logs_uri, job.hub_name, job.steps, job.tracking)
            engine = _MemberEngine(self.farm, member)
            sink = Checkpoints(job, 0, 1, self.farm.device)
            try:
                state = sink.resume(engine, logger)
            except BaseException:
                self.farm.remove(job.name)
                raise
            member.step = int(state.get("step", 0)) if state else 0
            logger.state("running", resumed_from=member.step, workers=1, pid=os.getpid(), started=started,
                         precision=self.precision.as_dict(), farm=self.name)
            runs[job.name] = _Run(waiter, member, logger, sink, engine, killer(job.name, job.out_uri, 0),
                                  poisoner(job.name, job.out_uri), member.step, started, time.perf_counter())
        except BaseException as e:
            waiter.error = e
            waiter.done.set()

    def _after_step(self, run: _Run, loss: float) -> None:
        t, done = run.member.options, run.member.step
        run.loss, run.window_steps = loss, run.window_steps + 1
        if run.first_step_at is None:
            run.first_step_at = time.time()
        if done % t.checkpoint_every == 0 or done == t.steps:
            run.sink.save(run.engine, done, loss)  # durable before the step is logged, as alone
        if done % t.log_every == 0 or done == t.steps or done == run.first_step + 1:
            elapsed = time.perf_counter() - run.window
            run.logger.log(done, loss=loss, lr=float(run.member.scheduler.get_last_lr()[0]),
                           tokens_per_s=run.window_steps * t.global_batch_size * t.seq_len / max(elapsed, 1e-9))
            run.window, run.window_steps = time.perf_counter(), 0
        if run.after_step is not None:  # a planned fault (stages.training.faults), tests only
            run.after_step(done)

    def _finish(self, run: _Run, error: BaseException | None = None) -> None:
        """Take the member out; export it when it is done; answer its call."""
        from branchout import storage
        from branchout.stages.training.loop import LoopResult

        job, member = run.waiter.job, run.member
        try:
            state = self.farm.adapter_state(job.name) if error is None else None
            if job.name in self.farm.members:
                self.farm.remove(job.name)
            if error is None:
                job.check_lease()
                export_adapter(state, member.options, self.targets, self.tokenizer, job, member.roles is not None)
                trained = member.options.steps - run.first_step
                elapsed = max(time.time() - (run.first_step_at or time.time()), 1e-9)
                result = LoopResult(first_step=run.first_step, steps=member.options.steps, final_loss=run.loss,
                                    tokens_per_s=trained * member.options.global_batch_size * member.options.seq_len
                                    / elapsed, seconds=elapsed, first_step_at=run.first_step_at)
                out = {**asdict(result), "started": run.started, "ended": time.time(), "model_uri": job.model_uri,
                       "pid": os.getpid(), "workers": 1, "precision": self.precision.as_dict(), "farm": self.name}
                storage.write_text(storage.join(job.out_uri, "result.json"), json.dumps(out))
                run.logger.state("succeeded", ended=out["ended"])
                run.waiter.result = out
        except BaseException as e:
            error = e
        finally:
            run.waiter.error = error
            try:
                run.logger.close()
            finally:
                run.waiter.done.set()


class _MemberEngine:
    """What ``checkpoints.Checkpoints`` saves and loads, for one member: a lone LoRA job's
    ``state.pt`` (its adapter under peft's names, optimizer, schedule, client state)."""

    def __init__(self, farm, member):
        self.farm, self.member = farm, member

    def save(self, path: str, client_state: dict[str, Any]) -> None:
        from branchout.stages.training.ds_files import write_state

        write_state(path, self.farm.adapter_state(self.member.name), self.member.optimizer, self.member.scheduler,
                    client_state)

    def load(self, path: str) -> dict[str, Any]:
        from branchout.stages.training.ds_files import read_state

        state = read_state(path, self.member.optimizer, self.member.scheduler, self.farm.device)
        self.farm.load_adapter(self.member.name, state["model"])
        return state["client_state"]


def export_adapter(state: dict, options, targets: list[str], tokenizer, job: TrainJob, instruct: bool) -> None:
    """A member's adapter as a PEFT directory (what ``PeftModel.from_pretrained`` loads, as a
    lone LoRA job exports it), with the tokenizer, published to ``job.model_uri``."""
    import tempfile

    from peft import LoraConfig
    from safetensors.torch import save_file

    from branchout.stages.prepare.instruct import with_chat_template
    from branchout.storage.checkpoint import publish_dir

    lora = options.lora
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                        task_type="CAUSAL_LM")
    with tempfile.TemporaryDirectory(prefix="branchout-export-") as tmp:
        config.save_pretrained(tmp)
        # peft saves an adapter's tensors without the adapter's name ("…lora_A.weight")
        save_file({k.replace(".default.", "."): v.contiguous() for k, v in state.items()},
                  os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
        (with_chat_template(tokenizer) if instruct else tokenizer).save_pretrained(tmp)
        publish_dir(tmp, job.model_uri, extra={"job": job.name, "steps": job.steps})

