"""The job graph is the one list of a pipeline's jobs: for every example pipeline, the run
record, the plan, cache keys, ``--rerun``, lineage and autoscaling bundles agree with it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from rich.tree import Tree

from branchout.cluster.autoscale import stage_bundles
from branchout.core.graph import Kind, build_graph
from branchout.orchestrator.config.loader import load_spec
from branchout.orchestrator.config.plan import build_plan
from branchout.orchestrator.run.cache import job_keys
from branchout.orchestrator.run.driver import create_run
from branchout.orchestrator.run.lineage import _related, lineage_tree

from conftest import REPO

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def _graph(path: Path, tmp_path: Path):
    spec = load_spec(path)
    spec.storage = str(tmp_path / "runs")
    return spec, build_graph(spec)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_reader_agrees_with_the_graph(path: Path, tmp_path):
    spec, graph = _graph(path, tmp_path)
    domains = [d.name for d in spec.finetune.domains]
    # every job once, parents first, each kind where the pipeline says
    assert len(graph.of(Kind.TOKENIZER)) == len(graph.of(Kind.PRETRAIN)) == 1
    assert [n.domain for n in graph.of(Kind.DATA)] == ["pretrain", *domains]
    assert [n.domain for n in graph.of(Kind.FINETUNE)] == [n.domain for n in graph.of(Kind.EVALUATE)] == domains
    assert len(graph.of(Kind.SCRATCH)) == (len(domains) if "scratch" in spec.evaluate.models else 0)
    seen: set[str] = set()
    for node in graph:
        assert set(node.parents.values()) <= seen, node.name
        seen.add(node.name)

    # the run record lists exactly the graph's jobs, with their kinds, domains and parents
    record = create_run(spec, graph, "r1")
    assert list(record.jobs) == graph.names
    for node in graph:
        rec = record.jobs[node.name]
        assert (rec.kind, rec.domain, rec.parents) == (node.kind, node.domain, list(node.parents.values()))
    assert sorted(record.of_kind(Kind.FINETUNE)) == sorted(domains)

    # the plan: one row per fan-out and evaluation job, on the graph's resources; the jobs run
    # from their node (an entry) listed after them
    plan = build_plan(spec, graph)
    planned = {j.name: j for j in plan.jobs}
    assert list(planned) == [n.name for n in graph if n.kind in (Kind.FINETUNE, Kind.SCRATCH, Kind.EVALUATE)]
    assert [j.name for j in plan.others] == [n.name for n in graph if n.entry]
    for name, job in {**planned, **{j.name: j for j in plan.others}}.items():
        assert (job.workers, job.resources, job.kind) == (graph[name].workers, graph[name].resources, graph[name].kind)
    assert plan.pretrain.steps == graph.pretrain_steps

    # cache keys: one per job, and a dataset's change moves exactly what descends from its readers
    fps = {n.domain: f"fp-{n.domain}" for n in graph.of(Kind.DATA)}
    keys = job_keys(graph, fps)
    assert list(keys) == graph.names and len(set(keys.values())) == len(keys)
    for dataset in fps:
        moved = job_keys(graph, {**fps, dataset: "changed"})
        readers = {n.name for n in graph if n.reads == dataset}
        assert {k for k in keys if keys[k] != moved[k]} == graph.descendants(readers), dataset

    # --rerun: a kind, a domain, a job, each with what depends on it
    assert graph.select([Kind.PRETRAIN]) == {"pretrain"} | {n.name for n in graph.of(Kind.FINETUNE, Kind.CROSS, Kind.LM_EVAL)} | \
        {n.name for n in graph.of(Kind.EVALUATE) if "base" in n.parents or "finetuned" in n.parents}
    first = domains[0]
    assert graph.select([first]) == {n.name for n in graph if n.domain == first and n.kind is not Kind.DATA}

    # lineage: every job but the data jobs, each drawn under its first non-data parent
    drawn: dict[str, str | None] = {}

    def walk(tree: Tree, parent: str | None) -> None:
        for child in tree.children:
            name = str(child.label).split("[/]")[0].removeprefix("[bold]")
            drawn[name] = parent
            walk(child, name)

    walk(lineage_tree(record), None)
    assert drawn == {n.name: n.lineage_parent for n in graph if n.kind is not Kind.DATA}
    for node in graph:
        assert _related(record, node.name, up=True) == graph.ancestors(node.name)
        assert _related(record, node.name, up=False) | {node.name} == graph.descendants({node.name})

    # autoscaling: each stage's bundles are its jobs' bundles (the fan-out up to max_concurrent)
    bundles = stage_bundles(graph)
    assert bundles["pretrain"] == graph["pretrain"].bundles
    assert bundles["evaluate"] == [b for n in graph.of(Kind.EVALUATE) for b in n.bundles]
    fanout = graph.of(Kind.FINETUNE, Kind.SCRATCH)
    width = min(spec.finetune.max_concurrent or len(fanout), len(fanout))
    farms = {n.farm for n in fanout[:width] if n.farm}  # a farm holds one bundle for its members
    expected = [b for n in fanout[:width] if not n.farm for b in n.bundles]
    expected += [graph[next(n.name for n in fanout if n.farm == f)].resources for f in sorted(farms)]
    assert sorted(map(str, bundles["fanout"])) == sorted(map(str, expected))
    # farms: every member a LoRA fine-tune that can farm, in groups of two or more
    for farm in farms:
        members = [n for n in graph.of(Kind.FINETUNE) if n.farm == farm]
        assert len(members) >= 2 and all(n.section.method == "lora" for n in members)


def test_a_fine_tune_starts_from_the_pretrain_and_a_baseline_does_not(tmp_path):
    spec, graph = _graph(REPO / "examples" / "quickstart.yaml", tmp_path)
    d = spec.finetune.domains[0].name
    assert graph[f"finetune/{d}"].parents == {"base": "pretrain", "data": f"data/{d}"}
    assert graph[f"scratch/{d}"].parents == {"tokenizer": "tokenizer", "data": f"data/{d}"}
    assert graph[f"scratch/{d}"].section.method == "full"
    assert "pretrain" not in graph.ancestors(f"scratch/{d}")
    with pytest.raises(ValueError, match="--rerun 'nope': not a job, stage or domain of quickstart"):
        graph.select(["nope"])


def test_cross_jobs_score_every_model_on_every_other_set_and_run_from_their_node(tmp_path):
    import importlib

    spec, graph = _graph(REPO / "examples" / "quickstart.yaml", tmp_path)
    assert spec.evaluate.cross
    domains = graph.domains
    assert [n.name for n in graph.of(Kind.CROSS)] == ["cross/base", *(f"cross/{d}" for d in domains)]
    assert graph["cross/base"].parents == {"base": "pretrain", "heldout:general": "data/pretrain"}
    for d in domains:
        node = graph[f"cross/{d}"]
        sets = {role.removeprefix("heldout:"): job for role, job in node.parents.items() if role.startswith("heldout:")}
        # every set but its own (the evaluation's), and the general text
        assert sets == {"general": "data/pretrain", **{o: f"data/{o}" for o in domains if o != d}}
        assert (node.parents["finetuned"], node.parents["scratch"]) == (f"finetune/{d}", f"scratch/{d}")
        assert node.lineage_parent == f"finetune/{d}"
    # the kinds the driver has stages for have no entry; the others' entries are real functions
    assert all(n.entry is None for n in graph if n.kind is not Kind.CROSS)
    for node in graph.of(Kind.CROSS):
        module, _, function = node.entry.partition(":")
        assert callable(getattr(importlib.import_module(module), function))
    # off by default: no cross jobs, and the other jobs' keys do not move
    spec.evaluate.cross = False
    plain = build_graph(spec)
    assert not plain.of(Kind.CROSS) and plain.names == [n for n in graph.names if not n.startswith("cross/")]
    fps = {n.domain: "fp" for n in plain.of(Kind.DATA)}
    keys, with_cross = job_keys(plain, fps), job_keys(graph, fps)
    assert all(with_cross[name] == key for name, key in keys.items())


# A job's name is "<kind>/<domain>"; only core/graph.py spells one (a kind followed by "/").
KIND_PATH = re.compile(rf"^({'|'.join(k.value for k in Kind)})/")


def _spelled_paths(path: Path) -> list[str]:
    """String constants (and the text starting an f-string) in ``path`` that begin with a
    job-kind path; docstrings are prose and not counted."""
    tree = ast.parse(path.read_text())
    docstrings = {id(body[0].value) for node in ast.walk(tree)
                  if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                  and (body := node.body) and isinstance(body[0], ast.Expr)
                  and isinstance(body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
            text = node.values[0].value
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            text = node.value
        else:
            continue
        if isinstance(text, str) and KIND_PATH.match(text):
            found.append(f"{path.relative_to(REPO)}:{node.lineno}: {text!r}")
    return found


def test_no_product_module_but_the_graph_spells_a_job_path():
    product = [p for folder in ("core", "storage", "cluster", "stages", "orchestrator")
               for p in sorted((REPO / folder).rglob("*.py")) if p != REPO / "core" / "graph.py"]
    assert len(product) > 50
    assert [hit for p in product for hit in _spelled_paths(p)] == []
    # the check finds one where there is one
    assert _spelled_paths(REPO / "core" / "graph.py")


def test_farms_group_lora_domains_that_can_train_together(write_pipeline):
    import copy

    from branchout.core.graph import FARM_MAX, farm_groups

    from conftest import TINY

    def groups(**domains) -> dict[str, str]:
        spec = copy.deepcopy(TINY)
        spec["finetune"]["domains"] = [{"name": n, "dataset": {"path": "legal.jsonl"}, **o} for n, o in domains.items()]
        return farm_groups(load_spec(write_pipeline(spec)))

    lora = {"method": "lora"}
    assert groups(a=lora, b=lora, c={"method": "full"}) == {"a": "farm-1", "b": "farm-1"}
    assert groups(a=lora, b={"method": "full"}) == {}  # auto: one LoRA domain trains alone
    assert groups(a={**lora, "farm": True}) == {"a": "farm-1"}  # unless asked
    assert groups(a=lora, b={**lora, "farm": False}) == {}
    # what members must share: block length, bundle; what keeps a domain out: dropout, several workers
    assert groups(a=lora, b={**lora, "seq_len": 16}, c=lora) == {"a": "farm-1", "c": "farm-1"}
    assert groups(a=lora, b={**lora, "resources_per_worker": {"cpu": 0.5}}) == {}
    assert groups(a=lora, b={**lora, "lora": {"dropout": 0.1}}) == {}
    assert groups(a=lora, b={**lora, "num_workers": 2, "micro_batch_size": 2}) == {}
    many = groups(**{f"d{i}": lora for i in range(FARM_MAX + 2)})
    assert [many[f"d{i}"] for i in (0, FARM_MAX - 1, FARM_MAX, FARM_MAX + 1)] == ["farm-1", "farm-1", "farm-2", "farm-2"]


def test_the_memory_planner_sizes_farms_on_a_known_gpu(write_pipeline):
    """A 1.1B base (2.2 GB in 16 bits) with 2048-token micro-batches of 2: each member's
    activations cost GBs, so an L4 holds a few members where an H200 holds FARM_MAX."""
    import copy

    from branchout.core.graph import FARM_MAX, farm_groups

    from conftest import TINY

    def farms(gpu: str) -> tuple[dict[str, str], list[str]]:
        spec = copy.deepcopy(TINY)
        spec["model"]["config"].update(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                       num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
        spec["finetune"]["defaults"].update(method="lora", seq_len=2048, micro_batch_size=2, global_batch_size=2,
                                            resources_per_worker={"cpu": 1, "gpu": 1, "accelerator": gpu})
        spec["evaluate"]["models"] = ["base", "finetuned"]
        spec["pretrain"]["seq_len"] = 2048
        spec["cluster"] = {"address": "auto"}  # a GPU cluster (an embedded Ray here has no GPU)
        spec["finetune"]["domains"] = [{"name": f"d{i}", "dataset": {"path": "legal.jsonl"}} for i in range(20)]
        loaded = load_spec(write_pipeline(spec))
        return farm_groups(loaded), loaded.notes

    big, notes = farms("H200-141GB")
    assert sorted(set(big.values())) == ["farm-1", "farm-2"] and list(big.values()).count("farm-1") == FARM_MAX
    assert not [n for n in notes if n.startswith("finetune.farm")]
    small, notes = farms("L4-24GB")
    sizes = [list(small.values()).count(f) for f in sorted(set(small.values()))]
    assert 2 <= max(sizes) < FARM_MAX and sum(sizes) == 20, sizes
    [note] = [n for n in notes if n.startswith("finetune.farm")]
    assert f"1 × L4-24GB holds {max(sizes)} LoRA member(s) of an adapter farm" in note


def test_farm_true_where_it_cannot_farm_is_one_line(write_pipeline):
    import copy

    from conftest import TINY, run_cli

    spec = copy.deepcopy(TINY)
    spec["finetune"]["domains"][0]["farm"] = True  # legal: a full fine-tune
    out = run_cli("validate", str(write_pipeline(spec)))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].endswith(
        "finetune.domains.0.farm: true, but this domain cannot train in an adapter farm: method is not lora "
        "(farm: auto trains it alone)"), out.stderr
