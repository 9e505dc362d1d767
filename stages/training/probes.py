"""``pretrain.probes``: short fine-tunes of every domain from the running pretrain, between its steps.

At each probe point (``ProbeSpec.points``) the pretrain's own workers pause:

1. the current weights are published as ``<pretrain>/probes/step_<N>/model`` (a collective
   under ZeRO-3, written by rank 0, as the final export is);
2. the domains are shared out over the ranks (domain ``i`` on rank ``i % world``); each rank
   fine-tunes its domains from that checkpoint for ``probes.steps`` steps, one at a time, on
   the same device, with the domain's own options (``stages.training.recipe.train``, one
   worker, held-out loss scored at its last step: ``eval_every``; nothing exported or
   checkpointed: its held-out loss is all it returns);
3. rank 0 gathers the probe losses, fits each domain's curve (``stages.evaluation.forecast``),
   writes ``probes/probes.json`` and ``probes/forecast.json``, and decides whether the
   pretrain should stop (``pretrain.stop``); every rank gets the decision.

A probe that fails (its data, an out-of-memory) is recorded with its error and a NaN loss
and never fails the pretrain. The probe history lives in ``probes.json``, so a restarted
pretrain continues it. Probing pauses training: its cost is part of the pretrain's wall
time (recorded as ``probe_seconds``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace

from branchout.stages.job import TrainJob


@dataclass(frozen=True)
class ProbeTarget:
    """One domain a probe fine-tunes: its data and the options a probe trains it with."""

    domain: str
    data_uri: str
    options: object  # FinetuneOptions: the domain's, with the probe's steps, method and one worker


class Prober:
    def __init__(self, job: TrainJob, rank: int, world: int, train):
        """``train``: ``stages.training.recipe.train``, which runs each probe (passed in: the
        recipe is what builds the prober)."""
        from branchout import storage

        self.job, self.rank, self.world, self.train = job, rank, world, train
        t = job.training
        self.spec = t.probes
        self.stop = t.stop
        self.points = self.spec.points(job.steps)
        self.tokens_per_step = t.global_batch_size * t.seq_len
        self.uri = storage.join(job.out_uri, "probes")
        self.history: dict[str, dict[str, dict]] = {}  # step → domain → {"loss", "error"}
        self.stopped_at: int | None = None
        self.why = ""
        self.seconds = 0.0
        self._tokenizer = None  # loaded at the first probe point, then lent to every probe
        self._forecasts: dict = {}  # rank 0: forecast_history's memo (each point re-reads every earlier one)
        if rank == 0 and storage.exists(storage.join(self.uri, "probes.json")):
            saved = json.loads(storage.read_text(storage.join(self.uri, "probes.json")))
            self.history, self.seconds = saved.get("history", {}), saved.get("probe_seconds", 0.0)

    def due(self, step: int) -> bool:
        return step in self.points

    def __call__(self, engine, step: int) -> bool:
        """Probe at ``step``; True when the pretrain should stop. Every rank must call it."""
        import torch

        from branchout.stages.training.loop import rng_state, set_rng_state

        started = time.time()
        model_uri = self._publish(engine, step)
        # a probe draws from the RNGs (adapter init) and sets torch's threads to its own
        # resources: the pretrain goes on as if it had not run
        rng, threads = rng_state(), torch.get_num_threads()
        mine = {}
        for i, target in enumerate(self.job.probes):
            if i % self.world == self.rank:
                mine[target.domain] = self._probe(target, model_uri, step)
        set_rng_state(rng)
        torch.set_num_threads(threads)
        results = self._gather(mine)
        self._recall_stop(engine, step)
        stop = False
        if self.rank == 0:
            self.history[str(step)] = results
            self.seconds += time.time() - started
            stop = self._decide(step)
        stop, self.why = self._broadcast([stop, self.why])
        if stop:
            self.stopped_at = step
        return bool(stop)

    def _recall_stop(self, engine, step: int) -> None:
        """A probe point inside the cooldown of a stop already decided (by this process, or
        before a restart: the decision rides in the checkpoint's ``early``) is probed and
        recorded, never decided again: the run's stop and its reason stay those of the point
        where it stopped."""
        from branchout import storage

        early = getattr(engine, "early", None)
        decided = early.stop_at if early is not None and early.stop_at is not None and early.stop_at < step else None
        if decided is None or self.stopped_at is not None:
            return
        self.stopped_at = decided
        saved = storage.join(self.uri, "forecast.json")
        if self.rank == 0 and storage.exists(saved):
            record = json.loads(storage.read_text(saved)).get("stop") or {}
            if record.get("stopped_at") == decided:
                self.why = record.get("why") or self.why

    def _publish(self, engine, step: int) -> str:
        """The current weights as an HF model directory every rank reads (rank 0 writes it)."""
        from branchout import storage
        from branchout.stages.training.engine import training_dtype
        from branchout.stages.training.model import export_model

        uri = storage.join(self.uri, f"step_{step:08d}", "model")
        weights = engine.state_dict_for_export()  # collective under ZeRO-3
        if self.rank == 0:
            tokenizer = self.tokenizer()
            module = getattr(engine, "module", None) or engine.model
            if weights is None:  # the plain engine: a copy in the training dtype (never cast the live model)
                dtype = training_dtype(self.job.training.deepspeed.precision)
                weights = {k: v.detach().to(dtype) if v.is_floating_point() else v.detach()
                           for k, v in module.state_dict().items()}
            export_model(module, tokenizer, uri, state_dict=weights)
        self._barrier()
        return uri

    def tokenizer(self):
        from branchout.stages.prepare.tokenizer import load_tokenizer
        from branchout.storage.checkpoint import fetch_verified

        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(fetch_verified(self.job.tokenizer_uri))
        return self._tokenizer

    def _probe(self, target: ProbeTarget, model_uri: str, step: int) -> dict:
        from branchout import storage

        name = f"{self.job.name}-probe-{step}-{target.domain}"
        job = replace(self.job, name=name, kind="finetune", training=target.options, steps=target.options.steps,
                      data_uri=target.data_uri, out_uri=storage.join(self.uri, f"step_{step:08d}", target.domain),
                      method=target.options.method, base_model_uri=model_uri, hub_name=None, lease=None,
                      tracking=None, mixture=(), replay=(), probes=(), model_path=None, export=False)
        try:
            result = self.train(job, tokenizer=self.tokenizer())
            # seconds: the whole probe; loop_seconds: its steps and scoring, without building it
            return {"loss": float(result["best_eval_loss"]), "seconds": result["ended"] - result["started"],
                    "loop_seconds": result["seconds"]}
        except Exception as e:  # a probe never fails the pretrain
            print(f"[branchout] {self.job.name}: probe of {target.domain} at step {step} failed: {e}", flush=True)
            return {"loss": math.nan, "error": f"{type(e).__name__}: {e}"}

    def _decide(self, step: int) -> bool:
        """Rank 0: forecasts from every probe point so far; the stop rule."""
        from branchout import storage
        from branchout.stages.evaluation.forecast import forecast_history, stop_decision

        steps = sorted(int(s) for s in self.history)
        domains = [t.domain for t in self.job.probes]
        budget = self.job.steps * self.tokens_per_step
        losses = {d: [self.history[str(s)].get(d, {}).get("loss", math.nan) for s in steps] for d in domains}
        history, now = forecast_history(steps, losses, self.tokens_per_step, budget, self._forecasts)
        stop, why = False, "no stop rule (pretrain.stop)"
        if self.stopped_at is not None:  # in the cooldown: the stop stands as it was decided
            why = self.why
        elif self.stop is not None and step < self.job.steps:
            stop, why = stop_decision(history, now, self.stop.epsilon, self.stop.weights, self.stop.patience)
        elif self.stop is not None:  # the budget's end: nothing left to save; keep why it went on
            why = f"the end of the budget; at the probe before: {self.why}" if self.why else "the end of the budget"
        self.why = why
        if stop:
            self.stopped_at = step
        latest = history[-1]
        report = {"tokens_per_step": self.tokens_per_step, "budget_tokens": budget, "points": steps,
                  "domains": {d: {**latest[d].as_dict(),
                                  "forecast_after": [{"step": s, "final_loss": h[d].final_loss, "verdict": h[d].verdict,
                                                      "why": h[d].why}
                                                     for s, h in zip(steps, history, strict=True)]}
                              for d in domains},
                  "stop": {"rule": self.stop.model_dump() if self.stop else None, "stopped_at": self.stopped_at,
                           "why": why}}
        storage.write_text(storage.join(self.uri, "forecast.json"), json.dumps(report, indent=1))
        storage.write_text(storage.join(self.uri, "probes.json"),
                           json.dumps({"history": self.history, "probe_seconds": self.seconds}, indent=1))
        return stop

    def outputs(self, steps_trained: int) -> dict:
        out = {"probe_points": sorted(int(s) for s in self.history), "probe_seconds": round(self.seconds, 2)}
        if self.stopped_at is not None:
            out.update(stopped_at=self.stopped_at, stop_reason=self.why,
                       tokens_saved=(self.job.steps - steps_trained) * self.tokens_per_step)
        return out

    # ---- collectives (the engine's process group; nothing when alone) ----

    def _distributed(self) -> bool:
        import torch.distributed as dist

        return self.world > 1 and dist.is_initialized()

    def _barrier(self) -> None:
        if self._distributed():
            import torch.distributed as dist

            dist.barrier()

    def _gather(self, mine: dict) -> dict:
        if not self._distributed():
            return mine
        import torch.distributed as dist

        parts: list = [None] * self.world
        dist.all_gather_object(parts, mine)
        return {k: v for part in parts for k, v in part.items()}

    def _broadcast(self, objects: list) -> list:
        if self._distributed():
            import torch.distributed as dist

            dist.broadcast_object_list(objects, src=0)
        return objects
