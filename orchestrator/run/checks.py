"""Cluster preflight: refuse, once connected and before any job starts, a run the cluster
can never hold or storage its nodes cannot all reach."""

from __future__ import annotations

from branchout import storage
from branchout.cluster.connect import ClusterInfo
from branchout.core.spec import PipelineSpec


def check_shared_storage(spec: PipelineSpec, cluster: ClusterInfo) -> None:
    """Refuse storage the cluster's nodes cannot all reach, before any job starts.

    Raises:
        StorageError: a plain local path on a multi-node cluster.
    """
    if cluster.nodes > 1 and storage.is_local(spec.storage) and not spec.storage.startswith("file://"):
        raise storage.StorageError(
            f"storage: {spec.storage} is a local directory but the cluster has {cluster.nodes} nodes; "
            "use storage every node shares (s3://…, gs://…), or write a shared mount as file:///path")


def check_capacity(spec: PipelineSpec, cluster: ClusterInfo) -> None:
    """Refuse, before any job, work this cluster can never hold (unless it autoscales).

    Raises:
        ClusterError: naming each request and what the cluster holds.
    """
    from branchout.cluster.capacity import impossible_requests
    from branchout.cluster.connect import ClusterError

    if spec.cluster.autoscaling:
        return
    p = spec.pretrain
    requests = [("pretrain", p.resources_per_worker.ray_bundle(), p.num_workers)]
    requests += [(f"finetune.domains.{d.name}", d.resources_per_worker.ray_bundle(), d.num_workers)
                 for d in spec.finetune.domains]
    problems = impossible_requests(requests)
    if problems:
        raise ClusterError("; ".join(problems) + " (set cluster.autoscaling: true if nodes are added on demand)")
