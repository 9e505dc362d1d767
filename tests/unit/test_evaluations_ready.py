"""Which evaluations start beside the fan-out (``orchestrator.run.evaluations``): a domain's
evaluation once every model it scores is done, each built once; what is left after the
fan-out scores the models that are done. The graph, spec and record are the product's own
(the tiny pipeline); nothing is submitted."""

from __future__ import annotations

from types import SimpleNamespace

from branchout.core.graph import build_graph
from branchout.orchestrator.config.loader import load_spec
from branchout.orchestrator.run.driver import create_run
from branchout.orchestrator.run.evaluations import Evaluations
from branchout.orchestrator.run.node_jobs import ready_now
from branchout.orchestrator.run.state import JobState


def _done(record, name: str, **outputs) -> None:
    record.set_job(name, JobState.QUEUED)
    record.set_job(name, JobState.RUNNING)
    record.set_job(name, JobState.SUCCEEDED, outputs=outputs)


def test_an_evaluation_is_ready_once_all_its_models_are_and_only_once(write_pipeline):
    spec = load_spec(write_pipeline())
    graph = build_graph(spec)
    record = create_run(spec, graph)
    for name in ("tokenizer", "data/pretrain", "data/legal", "data/code", "data/docs"):
        _done(record, name)
    _done(record, "pretrain", model_uri="/base")
    ctx = SimpleNamespace(record=record, graph=graph, spec=spec)
    data = {d.name: SimpleNamespace(uri=f"/data/{d.name}", kind="text") for d in spec.finetune.domains}
    evaluations = Evaluations(ctx, data, "/base", "/tok", pools=None)
    assert evaluations.ready() == []  # no domain has its fine-tune and its baseline yet

    _done(record, "finetune/legal", model_uri="/ft/legal")
    assert evaluations.ready() == []  # legal's baseline still trains
    _done(record, "scratch/legal", model_uri="/scratch/legal")
    _done(record, "finetune/code", model_uri="/ft/code")
    [legal] = evaluations.ready()
    assert legal.name == "evaluate/legal" and evaluations.ready() == []  # built once
    assert legal.resources == graph["evaluate/legal"].resources

    # after the fan-out: code's baseline failed, docs did not run at all; each is scored with what there is
    record.set_job("scratch/code", JobState.QUEUED)
    record.set_job("scratch/code", JobState.RUNNING)
    record.set_job("scratch/code", JobState.FAILED, error="broke")
    rest = evaluations.rest()
    assert [i.name for i in rest] == ["evaluate/code", "evaluate/docs"] and evaluations.rest() == []
    scored = {i.name: i.on_success({})["scored"] for i in (legal, *rest)}
    assert scored == {"evaluate/legal": {"base": ("/base", None), "finetuned": ("/ft/legal", None),
                                         "scratch": ("/scratch/legal", None)},
                      "evaluate/code": {"base": ("/base", None), "finetuned": ("/ft/code", None)},
                      "evaluate/docs": {"base": ("/base", None)}}


def test_a_cross_job_is_ready_beside_the_fanout_once_its_parents_are(write_pipeline):
    spec = load_spec(write_pipeline(evaluate={"heldout_fraction": 0.2, "max_blocks": 16, "batch_size": 8,
                                              "cross": True}))
    graph = build_graph(spec)
    record = create_run(spec, graph)
    for name in ("tokenizer", "data/pretrain", "data/legal", "data/code", "data/docs", "pretrain"):
        _done(record, name)
    requested = []
    ctx = SimpleNamespace(record=record, graph=graph, spec=spec, generic_tried=set(), pools=None, hub_name=None,
                          hints=SimpleNamespace(request=lambda bundles, why: requested.append(why)),
                          out_uri=lambda node: f"/run/{node.name}")
    assert [i.name for i in ready_now(ctx)] == ["cross/base"]  # the base's scores need no fine-tune
    assert ready_now(ctx) == []  # submitted once
    for name in ("finetune/legal", "scratch/legal"):
        _done(record, name)
    assert [i.name for i in ready_now(ctx)] == ["cross/legal"]
    assert requested == ["cross", "cross"]  # capacity asked for each wave
