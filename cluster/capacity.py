"""What the connected cluster can hold: slots for a bundle, and whether it ever fits.

Counts are per node, because a worker's bundle must fit on one node: two nodes with
one free GPU each cannot run a 2-GPU worker.
"""

from __future__ import annotations


def node_resources() -> list[dict[str, float]]:
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def slots(bundle: dict[str, float], nodes: list[dict[str, float]] | None = None) -> int:
    """How many copies of ``bundle`` the cluster holds at once (all nodes, when idle)."""
    nodes = node_resources() if nodes is None else nodes
    total = 0
    for node in nodes:
        fits = [node.get(k, 0.0) / v for k, v in bundle.items() if v > 0]
        total += int(min(fits) + 1e-9) if fits else 1 << 20
    return total


def unsatisfiable(bundle: dict[str, float], count: int, nodes: list[dict[str, float]] | None = None) -> str | None:
    """Why ``count`` copies of ``bundle`` can never run at once here, or None if they can.

    On an autoscaling cluster the nodes that exist now are not all there will be; the
    caller decides whether this is an error or something to wait for.
    """
    have = slots(bundle, nodes)
    if have >= count:
        return None
    shown = ", ".join(f"{k}={v:g}" for k, v in bundle.items())
    return f"needs {count} × {{{shown}}} but the cluster holds {have} at most"


def impossible_requests(requests: list[tuple[str, dict[str, float], int]],
                        nodes: list[dict[str, float]] | None = None) -> list[str]:
    """One line per (name, bundle, count) the connected cluster can never run at once."""
    nodes = node_resources() if nodes is None else nodes
    problems = []
    for name, bundle, count in requests:
        why = unsatisfiable(bundle, count, nodes)
        if why:
            problems.append(f"{name}: {why}")
    return problems


HEAD_RESOURCE = "node:__internal_head__"  # Ray gives this resource to the head node only


def nodes_for(bundle: dict[str, float], nodes: list[dict] | None = None) -> list[str]:
    """Ids of the alive nodes whose total resources hold ``bundle``, worker nodes first."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")] if nodes is None else nodes
    fitting = [n for n in nodes if all(n["Resources"].get(k, 0.0) >= v for k, v in bundle.items() if v > 0)]
    fitting.sort(key=lambda n: HEAD_RESOURCE in n["Resources"])
    return [n["NodeID"] for n in fitting]


def loader_options(bundle: dict[str, float], nodes: list[dict] | None = None) -> dict:
    """Ray options that run a short loader next to jobs of ``bundle``, without taking a slot.

    Pinning it where the jobs run keeps what it produces (its return value lives in the
    object store of its node) off the head node, and the jobs read it from local memory.
    It asks for no CPU or GPU: jobs may hold every slot while they wait for its result. It
    does ask for a sliver of each of the bundle's other resources (an ``accelerator_type:…``
    constraint keeps it on that kind of node even when none is up yet); the node it prefers
    is one that can hold the bundle now, softly, so a node that left does not strand it.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    custom = {k: min(v, 0.001) for k, v in bundle.items() if k not in ("CPU", "GPU") and v > 0}
    options: dict = {"num_cpus": 0, "num_gpus": 0, "resources": custom or None}
    candidates = nodes_for(bundle, nodes)
    if candidates:
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(candidates[0], soft=True)
    return options
