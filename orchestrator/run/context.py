"""What a run's stages share: the spec and its job graph, the record, the cluster, the
progress view, capacity hints, the stage cache and its keys; ``run`` submits a stage's
jobs through the fan-out loop (``orchestrator.run.fanout.run_jobs``)."""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from branchout import storage
from branchout.cluster.autoscale import CapacityHints, waiting_message
from branchout.cluster.connect import ClusterInfo
from branchout.core.graph import JobGraph, Node
from branchout.core.progress import hub_name
from branchout.core.spec import PipelineSpec
from branchout.orchestrator.config.plan import Plan
from branchout.orchestrator.run.cache import StageCache
from branchout.orchestrator.run.display import ProgressView
from branchout.orchestrator.run.fanout import Hooks, WorkItem, run_jobs
from branchout.orchestrator.run.pool import PoolSet
from branchout.orchestrator.run.state import RunRecord
from branchout.orchestrator.run.tracking import Tracker
from branchout.stages.job import TrainJob


@dataclass
class RunContext:
    spec: PipelineSpec
    graph: JobGraph
    plan: Plan
    record: RunRecord
    cluster: ClusterInfo
    view: ProgressView
    hints: CapacityHints
    cache: StageCache
    keys: dict[str, str]
    fingerprints: dict[str, str]
    tracker: Tracker
    hub: Any = None
    generic_tried: set[str] = field(default_factory=set)  # run_ready's jobs submitted by this driver
    pools: PoolSet | None = None  # the fan-out's warm runners, once they exist
    threads: cf.ThreadPoolExecutor = field(default_factory=lambda: cf.ThreadPoolExecutor(8))

    @property
    def run_uri(self) -> str:
        return self.record.run_uri

    @property
    def hub_name(self) -> str:
        return hub_name(self.record.run_id)

    def uri(self, *parts: str) -> str:
        return storage.join(self.run_uri, *parts)

    def out_uri(self, node: Node) -> str:
        """The job's folder in the run: ``<run>/finetune/legal``."""
        return self.uri(*node.path)

    def run(self, items: list[WorkItem], max_in_flight: int | None = None,
            on_tick: Callable[[dict], None] | None = None,
            more: Callable[[], list[WorkItem]] | None = None) -> dict[str, Any]:
        def tick(snapshot: dict) -> None:
            if on_tick:
                on_tick(snapshot)
            self.hints.refresh()
            self.view.update(self.record, snapshot)
            self.record.beat()

        def waiting(item: WorkItem, waited: float) -> None:
            if item.resources:
                self.view.note(waiting_message(item.name, item.resources, waited))

        def keyed(items: list[WorkItem]) -> list[WorkItem]:
            for item in items:
                item.key = item.key or self.keys.get(item.name)
            return items

        hooks = Hooks(tick=tick, waiting=waiting, note=self.view.note, done=self.tracker.job_ended)
        return run_jobs(self.record, keyed(items), self.hub, hooks, max_in_flight,
                        self.spec.cluster.capacity_timeout_s, self.cache,
                        more=(lambda: keyed(more())) if more else None)

    def claiming(self, job: TrainJob, submit: Callable[[], cf.Future]) -> Callable[[], cf.Future]:
        """``submit`` preceded by what each attempt needs: ownership of the job's directory
        (``TrainJob.claim``) and the MLflow child run its worker logs steps to."""

        def claim_and_submit() -> cf.Future:
            job.claim()
            job.tracking = self.tracker.child(job.name)
            return submit()

        return claim_and_submit
