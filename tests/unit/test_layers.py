"""The package's layers, checked on the source with ``ast`` (nothing is imported):

    core/          the spec vocabulary, the job graph and progress reporting; imports no other layer
    storage/       run storage (local or object stores) and checkpoint I/O; imports only core/
    cluster/  stages/   what runs on the cluster's nodes; never import orchestrator/
    orchestrator/  config, run, operate, cli: the driver side

and no import cycle among the package's modules, whatever the layer."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGES = ("core", "storage", "cluster", "stages", "orchestrator")


def _modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found["branchout." + ".".join(parts)] = path
    return found


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Each module's imports of the package's modules, wherever in the file they are."""
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            for target in targets:
                while target and target not in modules:  # `from pkg import name`: name may be a symbol
                    target = target.rpartition(".")[0]
                if target and target != name:
                    deps.add(target)
        graph[name] = deps
    return graph


def _layer(module: str) -> str:
    return module.split(".")[1]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_lower_layers_never_import_the_orchestrator():
    graph = _imports(_modules())
    assert len(graph) > 60  # the walk really found the package
    allowed = {"core": {"core"}, "storage": {"core", "storage"}, "cluster": {"core", "storage", "cluster", "stages"},
               "stages": {"core", "storage", "cluster", "stages"}}
    upward = sorted(f"{a} -> {b}" for a, deps in graph.items() for b in deps
                    if _layer(a) in allowed and _layer(b) not in allowed[_layer(a)])
    assert not upward, "imports that point up a layer:\n" + "\n".join(upward)


def test_no_import_cycles():
    cycles = _cycles(_imports(_modules()))
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_checks_catch_what_they_look_for():
    """The two checks above fail on a graph with the faults they exist for."""
    graph = {"branchout.stages.a": {"branchout.orchestrator.run.b"}, "branchout.orchestrator.run.b": {"branchout.stages.a"},
             "branchout.core.c": set()}
    assert _cycles(graph) == [["branchout.orchestrator.run.b", "branchout.stages.a"]]
    assert _layer("branchout.orchestrator.run.b") not in {"core", "cluster", "stages"}
