"""The evaluation stage: held-out perplexity per domain of base, fine-tuned and scratch
models, and their greedy answers to held-out prompts (scored by exact match and ROUGE-L on
instruction data), then ``eval/metrics.json``.

An evaluation does not wait for the whole fan-out: it starts beside the fan-out as soon as
every model it scores is done (``Evaluations.ready``, the fan-out loop's ``more``), so the
last fine-tunes and the first evaluations share the cluster instead of the evaluations
queuing behind a barrier. One whose models did not all succeed runs after the fan-out
(``stage_evaluate``) and scores what there is: the base always, a model when its job
succeeded or was cached.

One job per domain, placed like the domain's fine-tune (one worker's bundle: its GPU share,
accelerator type and CPUs) and scoring in its precision (``auto``: decided on its worker);
the driver (often on a small head node) loads no model.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
from collections.abc import Callable

from branchout import storage
from branchout.cluster.autoscale import stage_bundles
from branchout.core.graph import Kind, Node
from branchout.orchestrator.run.context import RunContext
from branchout.orchestrator.run.fanout import WorkItem, submit_task
from branchout.orchestrator.run.pool import PoolSet
from branchout.orchestrator.run.report import cross_matrix, forgetting, metrics_row, precisions
from branchout.stages.job import Candidate, EvalJob
from branchout.stages.prepare.data import PackedInfo


class Evaluations:
    """Each domain's evaluation job, built once: when all its models are done (``ready``),
    or after the fan-out with what there is (``rest``)."""

    def __init__(self, ctx: RunContext, data: dict[str, PackedInfo], base_uri: str, tokenizer_uri: str,
                 pools: PoolSet) -> None:
        self.ctx, self.data, self.base_uri, self.tokenizer_uri, self.pools = ctx, data, base_uri, tokenizer_uri, pools
        self.nodes = ctx.graph.of(Kind.EVALUATE)
        self.built: set[str] = set()

    def ready(self) -> list[WorkItem]:
        """The evaluations not built yet whose every model (and data) is done."""
        record = self.ctx.record
        return [self._item(n) for n in self.nodes
                if n.name not in self.built and all(record.job(p).state.done for p in n.parents.values())]

    def rest(self) -> list[WorkItem]:
        """Every evaluation not built yet, scoring the models that are done."""
        return [self._item(n) for n in self.nodes if n.name not in self.built]

    def _submit(self, job: EvalJob, node: Node) -> cf.Future:
        from branchout.stages.evaluation.evaluate import evaluate_domain

        ctx = self.ctx
        if not ctx.spec.finetune.warm_pool:
            return submit_task(evaluate_domain, (job,), node.resources, node.name, ctx.hub_name)
        left = sum(not ctx.record.job(n.name).state.done for n in self.nodes if n.resources == node.resources)
        return self.pools.submit_call(evaluate_domain, (job,), node.name, ctx.hub_name, node.resources, left)

    def _item(self, node: Node) -> WorkItem:
        self.built.add(node.name)
        ctx, ev = self.ctx, self.ctx.spec.evaluate
        domain = next(d for d in ctx.spec.finetune.domains if d.name == node.domain)
        candidates: dict[str, tuple[str, str | None]] = {}
        for model in ("base", "finetuned", "scratch"):  # the scoring order
            producer = node.parents.get(model)
            if producer is None:
                continue
            if model == "base":
                candidates[model] = (self.base_uri, None)
            elif ctx.record.job(producer).state.done:
                lora = model == "finetuned" and domain.method == "lora"  # an adapter on the base
                candidates[model] = (ctx.record.job(producer).outputs["model_uri"], self.base_uri if lora else None)
        job = EvalJob(domain=domain.name, data_uri=self.data[domain.name].uri,
                      candidates={name: Candidate(*c) for name, c in candidates.items()},
                      batch_size=ev.batch_size, max_blocks=ev.max_blocks,
                      threads=max(1, int(node.resources["CPU"])),
                      precision=domain.deepspeed.precision, use_gpu=domain.resources_per_worker.uses_gpu,
                      tokenizer_uri=self.tokenizer_uri, generation_samples=ev.generation_samples,
                      max_new_tokens=ev.max_new_tokens)
        previous = ctx.record.job(node.name).outputs.get("scored")
        return WorkItem(node.name, lambda: self._submit(job, node), resources=node.resources,
                        on_success=lambda r: {**r, "scored": candidates},
                        # a cached score stands only if it scored the same models
                        accept=lambda hit: _as_lists(hit.get("scored", {})) == _as_lists(candidates),
                        # a resume that redid a fine-tune must score it again
                        rerun=previous is not None and _as_lists(previous) != _as_lists(candidates))


def stage_evaluate(ctx: RunContext, evaluations: Evaluations, beside: Callable[[], list[WorkItem]]) -> None:
    """The evaluations the fan-out did not start (``beside``: the jobs that may run with
    them), then every domain's scores in ``eval/metrics.json``."""
    spec, ev = ctx.spec, ctx.spec.evaluate
    items = evaluations.rest()
    if items:
        ctx.hints.request(stage_bundles(ctx.graph)["evaluate"], "evaluate")
    ctx.run(items, more=beside)
    by_name = {d.name: d for d in spec.finetune.domains}
    results = {n.name: ctx.record.job(n.name).outputs for n in evaluations.nodes if ctx.record.job(n.name).state.done}
    domains, samples = {}, {}
    for node in evaluations.nodes:
        r = results.get(node.name)
        if r is None:
            continue
        domains[node.domain] = metrics_row(r, by_name[node.domain].method, evaluations.data[node.domain].kind)
        if r.get("samples"):
            samples[node.domain] = r["samples"]
    metrics = {"run_id": ctx.record.run_id, "pipeline": spec.name, "domains": domains,
               "pretrain": ctx.record.job(ctx.graph.of(Kind.PRETRAIN)[0].name).outputs,
               "precision": precisions(ctx.record)}
    if ev.cross:  # the cross jobs ran beside the fan-out and the evaluations (node_jobs.ready_now)
        metrics["cross"] = cross_matrix(ctx.graph, ctx.record, results)
        metrics["forgetting"] = forgetting(metrics["cross"], [n.name for n in ctx.graph.of(Kind.FINETUNE)],
                                           ev.forgetting)
    if ev.lm_eval:  # the harness's jobs too
        metrics["lm_eval"] = {r.outputs["model"]: r.outputs["scores"] for r in
                              (ctx.record.job(n.name) for n in ctx.graph.of(Kind.LM_EVAL)) if "scores" in r.outputs}
    storage.write_text(ctx.uri("eval", "metrics.json"), json.dumps(metrics, indent=1))
    storage.write_text(ctx.uri("eval", "samples.json"), json.dumps(samples, indent=1, ensure_ascii=False))


def _as_lists(candidates: dict) -> dict:
    return {k: list(v) for k, v in candidates.items()}
