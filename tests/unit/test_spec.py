"""Spec loading: every shipped example validates; every bad input is one line naming its field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from branchout.orchestrator.config.loader import SpecError, load_spec
from branchout.orchestrator.config.plan import build_plan

from conftest import REPO, TINY

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def test_examples_exist():
    assert len(EXAMPLES) >= 1


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_validates_and_plans(path: Path):
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# ") and "branchout" in first_line, "examples start with their command"
    spec = load_spec(path)
    plan = build_plan(spec)
    assert plan.pretrain.tokens_per_step > 0 and plan.params > 0
    assert set(plan.domains) == {d.name for d in spec.finetune.domains}


def problems_of(write_pipeline, mutate=None, overrides=None) -> list[str]:
    data = yaml.safe_load(yaml.safe_dump(TINY))
    if mutate:
        mutate(data)
    path = write_pipeline(data)
    with pytest.raises(SpecError) as info:
        load_spec(path, overrides)
    return info.value.problems


def test_tiny_spec_is_valid(write_pipeline):
    spec = load_spec(write_pipeline())
    assert spec.pretrain.deepspeed.zero_stage == 2
    assert [d.name for d in spec.finetune.domains] == ["legal", "code", "docs"]


def test_domains_inherit_defaults_and_merge_nested_sections(write_pipeline):
    data = yaml.safe_load(yaml.safe_dump(TINY))
    data["finetune"]["defaults"]["lora"] = {"rank": 4, "alpha": 12}
    data["finetune"]["defaults"]["resources_per_worker"] = {"cpu": 0.5}  # not the field's default
    data["finetune"]["domains"][2]["lora"] = {"rank": 16}
    spec = load_spec(write_pipeline(data))
    legal, _, docs = spec.finetune.domains
    assert legal.steps == 8 and legal.resources_per_worker.cpu == 0.5
    assert docs.method == "lora" and docs.lora.rank == 16 and docs.lora.alpha == 12


def test_unknown_key_names_its_path(write_pipeline):
    problems = problems_of(write_pipeline, lambda d: d["pretrain"].update(stpes=3))
    assert problems == ["pretrain.stpes: unknown key"]


def test_zero_stage_5(write_pipeline):
    problems = problems_of(write_pipeline, lambda d: d["pretrain"]["deepspeed"].update(zero_stage=5))
    assert len(problems) == 1
    assert problems[0] == "pretrain.deepspeed.zero_stage: must be 0, 1, 2, 3 or 'auto' (got 5)"


def test_wrong_type(write_pipeline):
    problems = problems_of(write_pipeline, lambda d: d["pretrain"].update(seq_len="long"))
    assert len(problems) == 1 and problems[0].startswith("pretrain.seq_len:")


def test_every_problem_reported_at_once(write_pipeline):
    def mutate(d):
        d["pretrain"]["deepspeed"]["zero_stage"] = 7
        d["pretrain"]["bogus"] = 1
        d["finetune"]["domains"][1]["steps"] = -1
        d.pop("name")

    problems = problems_of(write_pipeline, mutate)
    assert {p.split(":")[0] for p in problems} == {
        "pretrain.deepspeed.zero_stage", "pretrain.bogus", "finetune.domains.1.steps", "name"}


def test_bad_default_reported_once_not_per_domain(write_pipeline):
    problems = problems_of(write_pipeline, lambda d: d["finetune"]["defaults"].update(steps=0))
    assert problems == ["finetune.defaults.steps: Input should be greater than or equal to 1 (got 0)"]


def test_global_batch_not_divisible(write_pipeline):
    problems = problems_of(write_pipeline, lambda d: d["pretrain"].update(global_batch_size=10))
    assert problems == ["pretrain.global_batch_size: 10 is not divisible by num_workers × "
                        "micro_batch_size = 2 × 2 = 4"]


def test_cross_field_problems(write_pipeline):
    def mutate(d):
        d["pretrain"]["seq_len"] = 4096
        d["pretrain"]["deepspeed"].update(precision="fp16", offload_params=True)
        d["model"]["config"]["hiden_size"] = 3
        d["finetune"]["domains"][2]["lora"]["target_modules"] = ["nonexistent_proj"]

    problems = problems_of(write_pipeline, mutate)
    text = "\n".join(problems)
    assert "pretrain.deepspeed.offload_params: needs zero_stage 3" in text
    assert "pretrain.deepspeed.precision: fp16 needs a GPU" in text
    assert "model: LlamaConfig has no field(s): hiden_size" in text


def test_sequence_longer_than_positions_and_missing_lora_target(write_pipeline):
    def mutate(d):
        d["pretrain"]["seq_len"] = 4096
        d["finetune"]["domains"][2]["lora"]["target_modules"] = ["nonexistent_proj"]

    text = "\n".join(problems_of(write_pipeline, mutate))
    assert "pretrain.seq_len: 4096 exceeds the model's 128 positions" in text
    assert "finetune.domains.2.lora.target_modules: nonexistent_proj not found in llama" in text


def test_unknown_model_type(write_pipeline):
    problems = problems_of(write_pipeline, lambda d: d["model"].update(type="not-a-model"))
    assert problems == ["model: unknown model type 'not-a-model'"]


def test_embedded_ray_cannot_hold_request(write_pipeline):
    problems = problems_of(write_pipeline, lambda d: d["pretrain"].update(num_workers=64, global_batch_size=128))
    assert any(p.startswith("pretrain.num_workers: 64 workers") for p in problems)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "nope.yaml")
    assert info.value.problems == ["file not found"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError) as info:
        load_spec(bad)
    assert info.value.problems[0].startswith("line ") and "invalid YAML" in info.value.problems[0]


def test_set_overrides(write_pipeline):
    path = write_pipeline()
    spec = load_spec(path, ["pretrain.steps=30", "finetune.domains.1.method=lora",
                            "pretrain.deepspeed.zero_stage=3"])
    assert spec.pretrain.steps == 30 and spec.pretrain.deepspeed.zero_stage == 3
    assert spec.finetune.domains[1].method == "lora"
    with pytest.raises(SpecError) as info:
        load_spec(path, ["finetune.domains.9.steps=1", "novalue"])
    assert info.value.problems == ["--set finetune.domains.9.steps: no list item '9' (list has 3 items)",
                                   "--set 'novalue': expected key.path=value"]


def test_plan_arithmetic(write_pipeline):
    spec = load_spec(write_pipeline(), ["pretrain.tokens=10000", "pretrain.steps=null"])
    plan = build_plan(spec).pretrain
    # 2 workers × micro 2 × accum 2 × 32 tokens = 256 tokens/step; ceil(10000 / 256) = 40 steps
    assert (plan.workers, plan.micro_batch, plan.grad_accum, plan.seq_len) == (2, 2, 2, 32)
    assert plan.tokens_per_step == 256 and plan.steps == 40 and plan.checkpoints == 7


def _schema_validator():
    import json

    import jsonschema

    schema = json.loads((REPO / "docs" / "pipeline.schema.json").read_text())
    return jsonschema.Draft202012Validator(schema)


def test_published_schema_is_generated_from_the_models():
    from branchout.orchestrator.config.schema import render

    assert (REPO / "docs" / "pipeline.schema.json").read_text() == render(), \
        "regenerate: python -m branchout.orchestrator.config.schema > docs/pipeline.schema.json"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_names_and_passes_the_schema(path: Path):
    assert path.read_text().splitlines()[1] == "# yaml-language-server: $schema=../docs/pipeline.schema.json"
    errors = list(_schema_validator().iter_errors(yaml.safe_load(path.read_text())))
    assert not errors, [e.message for e in errors]


def test_schema_reports_a_wrong_field_as_validate_does(write_pipeline):
    data = yaml.safe_load(yaml.safe_dump(TINY))
    data["pretrain"]["stepz"] = 5
    data["finetune"]["domains"][0]["method"] = "qlora"
    errors = sorted(_schema_validator().iter_errors(data), key=lambda e: list(e.absolute_path))
    where = {".".join(map(str, e.absolute_path)) or "(top)": e.message for e in errors}
    assert "stepz" in where.get("pretrain", "") and "'qlora' is not one of" in where["finetune.domains.0.method"]
    assert set(problems_of(write_pipeline, lambda d: d.update(data))) >= {
        "pretrain.stepz: unknown key", "finetune.domains.0.method: Input should be 'full' or 'lora' (got 'qlora')"}


# --- the validators themselves, model by model (mutation testing found them untested here) ---

def _refused(model, data: dict, says: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as e:
        model.model_validate(data)
    assert says in str(e.value), str(e.value)


def test_numbers_switches_and_counts_are_not_coerced():
    from branchout.core.spec import DeepSpeedSpec, OptimizerSpec, ScheduleSpec, TokenizerSpec

    _refused(ScheduleSpec, {"warmup_steps": True}, "expected a number, not true/false")
    _refused(ScheduleSpec, {"warmup_steps": 2.5}, "expected a whole number")
    _refused(ScheduleSpec, {"warmup_steps": "12"}, "expected a whole number")
    _refused(DeepSpeedSpec, {"offload_optimizer": "yes"}, "expected true or false")
    for bad in (float("inf"), float("nan"), "inf", "-inf"):
        _refused(OptimizerSpec, {"weight_decay": bad}, "must be a finite number")
    _refused(OptimizerSpec, {"lr": "fast"}, "valid number")  # pydantic's own words for text
    assert OptimizerSpec.model_validate({"lr": "3e-4"}).lr == 3e-4  # YAML 1.1 reads 3e-4 as text
    assert OptimizerSpec.model_validate({"lr": 1}).lr == 1.0  # an int is a number
    assert ScheduleSpec.model_validate({"warmup_steps": 7}).warmup_steps == 7
    assert TokenizerSpec.model_validate({"path": None}).path is None
    # what is neither a number nor a switch is left to pydantic's own words, not called a number
    _refused(TokenizerSpec, {"path": True}, "valid string")
    # text that reads as a number is still text where text is asked for
    assert TokenizerSpec.model_validate({"path": "inf"}).path == "inf"
    # a number too large for a float, or no number at all, is one clean error, not a crash
    _refused(OptimizerSpec, {"lr": 10**400}, "valid number")
    _refused(OptimizerSpec, {"lr": [1e-3]}, "valid number")


def test_a_misshapen_domain_list_is_one_clean_error(write_pipeline):
    assert problems_of(write_pipeline, lambda d: d["finetune"].update(domains={"legal": {"steps": 3}})) == [
        "finetune.domains: Input should be a valid list"]
    # defaults with no domains: the missing list is named, not tripped over
    assert problems_of(write_pipeline, lambda d: d["finetune"].pop("domains")) == [
        "finetune.domains: name at least one domain to fine-tune"]


def test_a_mixture_source_name_is_a_slug():
    from branchout.core.spec import SourceSpec

    _refused(SourceSpec, {"path": "a.jsonl", "name": "web/../crawl", "weight": 1}, "must be 1-64 characters")
    assert SourceSpec.model_validate({"path": "a.jsonl", "name": "web.v2", "weight": 1}).name == "web.v2"


def test_scalar_kinds_of_annotations():
    from typing import Annotated, Literal

    from branchout.core.spec import _scalar_kinds

    assert _scalar_kinds(int | None) == {int}
    assert _scalar_kinds(Literal["auto", 3]) == {str, int}
    assert _scalar_kinds(Annotated[float, "why"]) == {float}
    assert _scalar_kinds(Annotated[bool, int]) == {bool}
    assert _scalar_kinds(list[int]) == set() and _scalar_kinds(dict) == set()


def test_betas_and_zero_stage_bounds():
    from branchout.core.spec import DeepSpeedSpec, OptimizerSpec

    assert OptimizerSpec.model_validate({"betas": [0.0, 0.999]}).betas == (0.0, 0.999)
    for betas in ([0.9, 1.0], [-0.1, 0.9]):
        _refused(OptimizerSpec, {"betas": betas}, "each beta must be in [0, 1)")
    for stage in (0, 3, "auto"):
        assert DeepSpeedSpec.model_validate({"zero_stage": stage}).zero_stage == stage
    for stage in (-1, 4, True, "2"):
        _refused(DeepSpeedSpec, {"zero_stage": stage}, "must be 0, 1, 2, 3 or 'auto'")


def test_probe_points_and_their_settings():
    from branchout.core.spec import ProbeSpec

    assert ProbeSpec().points(160) == [10, 20, 40, 80, 120, 160]  # the default fractions
    assert ProbeSpec(at=[0.01]).points(10) == [1]  # never step 0
    assert ProbeSpec(every=10).points(35) == [10, 20, 30] and ProbeSpec(every=10).points(30) == [10, 20, 30]
    assert ProbeSpec(every=10).points(39) == [10, 20, 30]  # never past the pretrain's last step
    assert ProbeSpec(at=[0.5, 0.25, 0.5, 1]).at == [0.25, 0.5, 1]
    assert ProbeSpec(at=None).at is None
    for at in ([], [0], [1.5], [-0.5]):
        _refused(ProbeSpec, {"at": at}, "probe points are fractions of the pretrain in (0, 1]")
    _refused(ProbeSpec, {"at": [0.5], "every": 10}, "give `at` (fractions) or `every` (steps), not both")


def test_model_and_tokenizer_sources(write_pipeline):
    import copy

    from branchout.core.spec import ModelSpec, PipelineSpec

    for both in ({"path": "org/m", "type": "llama"}, {"path": "org/m", "config": {"hidden_size": 8}}):
        _refused(ModelSpec, both, "give either `path`")
    _refused(ModelSpec, {"revision": "v1"}, "`revision` pins a hub `path`; there is none")
    assert ModelSpec.model_validate({"path": "org/m", "revision": "v1"}).revision == "v1"
    assert ModelSpec.model_validate({}).type == "llama"
    spec = copy.deepcopy(TINY)
    del spec["tokenizer"]
    spec["model"] = {"path": "org/base"}
    assert PipelineSpec.model_validate(spec).tokenizer.path == "org/base"  # the model's own tokenizer
    spec["tokenizer"] = {"path": "org/other-tokenizer"}
    assert PipelineSpec.model_validate(spec).tokenizer.path == "org/other-tokenizer"
    assert PipelineSpec.model_validate(copy.deepcopy(TINY)).tokenizer.path is None  # a new model, a new tokenizer


def test_pretraining_sources_stop_and_domains(write_pipeline):
    from branchout.core.spec import FinetuneSpec, PretrainSpec

    sources = [{"name": "web", "path": "a.jsonl", "weight": 0.8}, {"name": "books", "path": "b.jsonl", "weight": 0.2}]
    assert len(PretrainSpec.model_validate({"datasets": sources, "steps": 4}).datasets) == 2
    _refused(PretrainSpec, {"datasets": [sources[0], {**sources[1], "name": "web"}], "steps": 4},
             "source names must be unique; repeated: web")
    _refused(PretrainSpec, {"dataset": {"path": "a.jsonl"}, "steps": 4, "stop": {}},
             "`stop` acts on the probes' forecasts: set `probes` too")
    with_probes = {"dataset": {"path": "a.jsonl"}, "steps": 4, "probes": {}, "stop": {}}
    assert PretrainSpec.model_validate(with_probes).stop is not None
    domain = {"name": "legal", "dataset": {"path": "l.jsonl"}}
    _refused(FinetuneSpec, {"domains": [domain, domain]}, "domain names must be unique; repeated: legal")
    _refused(FinetuneSpec, {"defaults": ["steps"], "domains": [domain]}, "defaults")  # a clean error, not a crash
    assert FinetuneSpec.model_validate({"defaults": {"steps": 9}, "domains": [domain]}).domains[0].steps == 9
