"""Jobs the driver runs from their graph node alone (``core.graph.Node.entry``).

Kinds without a stage function of their own (``cross``, and whatever kinds are added the
same way) run here: beside the fan-out and the evaluations, each as soon as its parents are
done (``ready_now``), and after each stage (``run_ready``), wave by wave.
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib

from branchout.core.graph import Node
from branchout.orchestrator.run.context import RunContext
from branchout.orchestrator.run.fanout import WorkItem, submit_task
from branchout.stages.job import NodeJob


def run_ready(ctx: RunContext) -> None:
    """Run, wave by wave, every job the driver has no stage for (its node names a worker
    function: ``core.graph.Node.entry``) once all its parents are done. Each is a Ray task
    on its node's bundle, given a ``NodeJob`` (the node, the spec, its parents' outputs by
    role; on the fan-out's warm runners once they exist); what the function returns is
    recorded as its outputs. A job one of whose parents failed stays pending, and is
    recorded as skipped when the stages end. The stages also run these jobs beside their
    own as their parents end (``ready_now``, the fan-out loop's ``more``): this catches the
    ones whose parents were done by then."""
    while wave := ready_now(ctx):
        ctx.run(wave)


def ready_now(ctx: RunContext) -> list[WorkItem]:
    """The jobs with an ``entry`` whose parents are all done and that this driver has not
    submitted yet, as work items (each submitted once: a failed one is not tried again here)."""
    tried = ctx.generic_tried
    wave = [n for n in ctx.graph if n.entry and n.name not in tried and not ctx.record.job(n.name).state.done
            and all(ctx.record.job(p).state.done for p in n.parents.values())]
    if not wave:
        return []
    tried.update(n.name for n in wave)
    ctx.hints.request([b for n in wave for b in n.bundles], ", ".join(dict.fromkeys(n.kind.value for n in wave)))
    return [_node_item(ctx, n, sum(m.resources == n.resources for m in wave)) for n in wave]


def _node_item(ctx: RunContext, node: Node, same_bundle: int) -> WorkItem:
    """``same_bundle``: the jobs of its wave on its bundle (the width of warm runners they need)."""
    module, _, function = node.entry.partition(":")
    fn = getattr(importlib.import_module(module), function)
    job = NodeJob(node=node, spec=ctx.spec, out_uri=ctx.out_uri(node), run_id=ctx.record.run_id,
                  hub_name=ctx.hub_name,
                  inputs={role: ctx.record.job(parent).outputs for role, parent in node.parents.items()})

    def submit() -> cf.Future:
        if ctx.pools is not None:  # after the fan-out: on its warm runners (torch imported) as evaluations are
            return ctx.pools.submit_call(fn, (job,), node.name, ctx.hub_name, node.resources, same_bundle)
        return submit_task(fn, (job,), node.resources, node.name, ctx.hub_name)

    return WorkItem(node.name, submit, resources=node.resources, on_success=dict)
