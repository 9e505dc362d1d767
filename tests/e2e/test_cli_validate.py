"""`branchout validate` / `run` as a user runs them: bad input is one line, exit 2, no traceback."""

from __future__ import annotations

import json

import pytest
import yaml

from branchout.orchestrator.config.loader import load_spec
from branchout.orchestrator.config.preflight import preflight

from conftest import TINY, run_cli


def _spec(mutate=None) -> dict:
    data = yaml.safe_load(yaml.safe_dump(TINY))
    if mutate:
        mutate(data)
    return data


def test_validate_prints_the_plan(write_pipeline):
    out = run_cli("validate", str(write_pipeline()))
    assert out.returncode == 0, out.stderr
    assert "2 workers × micro-batch 2 × grad-accum 2 × 32 tokens = 256 tokens/step" in out.stdout
    assert "12 steps = 3,072 tokens; 2 checkpoint(s)" in out.stdout
    assert "is valid" in out.stdout


def _empty(tmp):
    (tmp / "empty.jsonl").write_text("")
    return str(tmp / "empty.jsonl")


def _no_column(tmp):
    (tmp / "body.jsonl").write_text("\n".join(json.dumps({"body": "x " * 500}) for _ in range(50)))
    return str(tmp / "body.jsonl")


def _tiny(tmp):
    (tmp / "tiny.jsonl").write_text(json.dumps({"text": "just a few words"}) + "\n")
    return str(tmp / "tiny.jsonl")


def _binary(tmp):
    (tmp / "bin.jsonl").write_text("\n".join(json.dumps({"text": "\x00\x01\x02\x03" * 300}) for _ in range(30)))
    return str(tmp / "bin.jsonl")


CASES = {
    "missing_data_file": (lambda tmp: str(tmp / "nope.jsonl"), "finetune.domains.0.dataset: ", "nope.jsonl: no such file"),
    "empty_dataset": (_empty, "finetune.domains.0.dataset: ", "empty"),
    "missing_text_column": (_no_column, "finetune.domains.0.dataset: ", "no column 'text'"),
    "smaller_than_a_block": (_tiny, "finetune.domains.0.dataset: ", "less than one 32-token block"),
    "binary_garbage": (_binary, "finetune.domains.0.dataset: ", "looks binary"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_data_is_one_line_exit_2(case, write_pipeline, tmp_path):
    make, field, message = CASES[case]
    path = make(tmp_path)
    spec_path = write_pipeline(_spec(lambda d: d["finetune"]["domains"][0].update(dataset={"path": path})))
    # the in-process preflight gives the same line the CLI prints
    problems, _ = preflight(load_spec(spec_path))
    assert len(problems) == 1 and problems[0].startswith(field) and message in problems[0], problems


SPEC_CASES = {
    "unknown_key": (lambda d: d["pretrain"].update(stpes=3), "pretrain.stpes: unknown key"),
    "wrong_type": (lambda d: d["pretrain"].update(steps="many"), "pretrain.steps:"),
    "zero_stage_5": (lambda d: d["pretrain"]["deepspeed"].update(zero_stage=5), "pretrain.deepspeed.zero_stage:"),
    "batch_not_divisible": (lambda d: d["pretrain"].update(global_batch_size=6), "pretrain.global_batch_size: 6 is not divisible"),
    "domain_smaller_than_block": (None, "finetune.domains.0.dataset:"),
}


@pytest.mark.parametrize("case", list(SPEC_CASES))
def test_cli_bad_input(case, write_pipeline, tmp_path):
    """`run` as a subprocess; `validate` gives the same lines (tests/test_bad_input_corpus.py)."""
    command = "run"
    mutate, expect = SPEC_CASES[case]
    if mutate is None:
        path = _tiny(tmp_path)
        mutate = lambda d: d["finetune"]["domains"][0].update(dataset={"path": path})  # noqa: E731
    spec_path = write_pipeline(_spec(mutate))
    out = run_cli(command, str(spec_path))
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"error: {spec_path}: {expect}"), lines[0]
    assert "Traceback" not in out.stderr + out.stdout
    assert not (tmp_path / "runs").exists(), "nothing may start before the input is valid"


def test_missing_pipeline_file(tmp_path):
    out = run_cli("validate", str(tmp_path / "nope.yaml"))
    assert out.returncode == 2
    assert out.stderr.strip() == f"error: {tmp_path / 'nope.yaml'}: file not found"


def test_plan_says_fp32_and_why_where_bf16_would_be_emulated(write_pipeline):
    """``ONEDNN_MAX_CPU_ISA=AVX2`` makes torch emulate bf16 on any CPU, as an AVX2-only one
    does (measured: 2.0 vs 201.7 GFLOP/s on an AVX512-BF16 EPYC), so this holds on both kinds."""
    from branchout.core.precision import cpu_hardware

    pipeline = str(write_pipeline())
    out = run_cli("plan", pipeline, env={"ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())  # rich wraps long lines
    assert "pretrain: precision auto → fp32 (CPU " in text, text
    assert "bf16 would be emulated, many times slower)" in text
    # validate's (and run's) pretrain line says the same: tests/unit/test_precision.py
    out = run_cli("validate", pipeline, "--set", "pretrain.deepspeed.precision=bf16", env={"ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert out.returncode == 0, out.stderr
    warning = " ".join(out.stdout.split())
    assert "warning: pretrain: precision bf16 on CPU " in warning and "many times slower than fp32" in warning
    if cpu_hardware().bf16:  # and on a CPU that does bf16 natively, the same file plans bf16
        out = run_cli("plan", pipeline)
        assert "pretrain: precision auto → bf16 (CPU " in out.stdout, out.stdout
