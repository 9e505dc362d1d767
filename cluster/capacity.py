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
