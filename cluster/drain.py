"""A Kubernetes pod's preStop hook: its deletion becomes a Ray preemption drain.

A spot node reclaimed by GKE or EKS, a node pool scaled down, ``kubectl delete pod``: the
kubelet runs the container's preStop hook, then sends SIGTERM, then SIGKILL once
``terminationGracePeriodSeconds`` have passed. A Ray worker that just gets SIGTERM dies with
the work since its last checkpoint. This hook tells Ray first: it drains this node with reason
PREEMPTION and the grace period as deadline, which Ray Train's watcher turns into a preemption
notice for the jobs with workers here (``ray.train.get_preemption_info``); branchout's training
loop checkpoints the step it is at and the job continues on other nodes
(``orchestrator.run.ray_train``). The hook then waits, up to the grace period, until no
training worker is left on the node, so the pod is not stopped under a checkpoint being
written; a node with none returns at once (an idle node scaled down pays nothing).

    python -m branchout.cluster.drain --grace 110
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

# the Ray Train worker actor's class: what holds a training job's state on a node
TRAIN_WORKER = "RayTrainWorker"


def train_workers_here(node_id: str) -> int:
    """How many live Ray Train workers run on ``node_id``."""
    from ray.util.state import list_actors

    return len(list_actors(filters=[("node_id", "=", node_id), ("state", "=", "ALIVE"),
                                    ("class_name", "=", TRAIN_WORKER)], raise_on_missing_output=False))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m branchout.cluster.drain", description=__doc__.split("\n")[0])
    parser.add_argument("--grace", type=float, default=110.0,
                        help="seconds until the pod is killed: the drain's deadline and the longest wait")
    parser.add_argument("--poll", type=float, default=2.0, help="seconds between checks for training workers")
    parser.add_argument("--address", default="auto", help="the cluster's GCS (default: this node's)")
    parser.add_argument("--node-id", help="the node to drain (default: this one)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    started = time.time()
    import ray

    ray.init(address=args.address, logging_level="ERROR", log_to_driver=False)
    node_id = args.node_id or ray.get_runtime_context().get_node_id()
    address = [] if args.address == "auto" else ["--address", args.address]
    drained = subprocess.run(
        ["ray", "drain-node", *address, "--node-id", node_id, "--reason", "DRAIN_NODE_REASON_PREEMPTION",
         "--reason-message", "Kubernetes is deleting this pod", "--deadline-remaining-seconds", str(int(args.grace))],
        capture_output=True, text=True)
    if drained.returncode != 0:  # say why, and let Kubernetes go on: the hook must not hold the pod
        print(f"branchout drain: ray drain-node failed: {drained.stderr.strip()[-500:]}", file=sys.stderr)
        return 1
    while time.time() - started < args.grace and train_workers_here(node_id):
        time.sleep(args.poll)
    left = train_workers_here(node_id)
    print(f"branchout drain: node {node_id[:12]} drained; {left} training worker(s) left after "
          f"{time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
