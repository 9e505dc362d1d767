"""Hostile and careless input to the CLI gets one clean line and exit 2 (issue 32): each case
below crashed, hung or was silently accepted before."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from branchout.orchestrator.cli import app

REPO = Path(__file__).resolve().parents[2]


def _validate(path) -> object:
    return CliRunner().invoke(app, ["validate", str(path)])


def test_a_key_given_twice_is_refused_not_half_ignored(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("name: a\npretrain: {steps: 1}\nname: b\n")
    result = _validate(path)
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {path}: line 3, column 1: invalid YAML: duplicate key 'name'"


def test_a_nested_key_given_twice_is_refused_too(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("name: a\npretrain:\n  steps: 1\n  steps: 2\n")
    result = _validate(path)
    assert result.exit_code == 2 and "line 4, column 3: invalid YAML: duplicate key 'steps'" in result.stderr


@pytest.mark.parametrize("special", ["/dev/zero", "fifo"])
def test_a_device_or_pipe_is_refused_without_reading_it(tmp_path, special):
    if special == "fifo":
        special = str(tmp_path / "pipe.yaml")
        os.mkfifo(special)  # a read would block forever: nobody writes to it
    result = _validate(special)
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {special}: not a regular file (a device, pipe or socket?)"


def test_markup_and_terminal_escapes_in_keys_print_as_text(tmp_path):
    path = tmp_path / "markup.yaml"
    path.write_text('"[/x]": 1\n"\\x1b[2Jkey": 2\nname: ok\npretrain: {steps: 1, dataset: {path: x}}\n')
    result = _validate(path)
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert f"error: {path}: [/x]: unknown key" in lines
    assert f"error: {path}: \\x1b[2Jkey: unknown key" in lines
    assert "\x1b" not in result.stderr


@pytest.mark.parametrize(("option", "value"), [("--gpu-mem", "nan"), ("--gpu-mem", "-5"), ("--gpu-mem", "0"),
                                               ("--step-s", "inf"), ("--step-s", "-1")])
def test_plan_refuses_sizes_and_times_that_are_not(option, value):
    result = CliRunner().invoke(app, ["plan", str(REPO / "examples" / "llama-1b.yaml"), option, value])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {option}: ")


def test_version():
    from importlib.metadata import version

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"branchout {version('branchout')}"


@pytest.mark.parametrize("path", ["/data/my runs/tiny/r1", "/data/x;touch /tmp/branchout-pwned", "/d/$(id)/`id`/'q'"])
def test_a_resumed_runs_path_reaches_the_driver_as_one_argument(path):
    """Before: the entrypoint was joined with spaces and run by a shell on the head node."""
    import shlex

    from branchout.orchestrator.operate.jobs import driver_entrypoint, entrypoint_command

    argv = driver_entrypoint("--resume", path)
    assert shlex.split(entrypoint_command(argv)) == argv


@pytest.mark.parametrize("uri", ["s3://AKIAKEY:SECRETVALUE@bucket/model", "https://user:SECRETVALUE@host/model",
                                 "gs://SECRETVALUE@bucket/model"])
def test_a_model_path_with_credentials_is_refused_before_it_is_opened(tmp_path, uri):
    """Before: an s3://KEY:SECRET@ model path was accepted, and an https one failed in a
    traceback that printed the password."""
    path = tmp_path / "secret.yaml"
    path.write_text(f'name: t\nmodel: {{path: "{uri}"}}\npretrain: {{steps: 0, dataset: {{path: x}}}}\n'
                    "finetune: {domains: [{name: a, dataset: {path: x}}]}\n")
    result = _validate(path)
    assert result.exit_code == 2
    assert f"error: {path}: model.path: the URI embeds credentials" in result.stderr
    assert "SECRETVALUE" not in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(("path", "value", "why"), [
    ("pretrain.seed", -1, "greater than or equal to 0"),
    ("pretrain.seed", 2**64, "less than or equal to 4294967295"),
    ("evaluate.split_seed", -3, "greater than or equal to 0"),
    ("finetune.domains.0.name", "legal\n", "must be 1-64 characters"),
    ("pretrain.steps", "12", "expected a whole number"),
    ("pretrain.steps", 12.0, "expected a whole number"),
    ("pretrain.steps", True, "expected a number, not true/false"),
    ("pretrain.steps", 10**30, "less than or equal to 1000000000"),
    ("pretrain.activation_checkpointing", "yes", "expected true or false"),
    ("pretrain.optimizer.weight_decay", float("inf"), "must be a finite number"),
    ("pretrain.optimizer.lr", "nan", "must be a finite number"),
    ("finetune.domains.2.lora.alpha", float("inf"), "must be a finite number"),
    ("pretrain.resources_per_worker.cpu", float("nan"), "must be a finite number"),
    ("finetune.domains.1.name", "Legal", "differs from 'legal' only by case"),
])
def test_values_that_were_accepted_or_coerced_are_refused(path, value, why):
    """Before: each of these was accepted (several failing only once compute had started)."""
    import copy

    from branchout.orchestrator.config.loader import SpecError, validate_spec

    from conftest import TINY

    raw = copy.deepcopy(TINY)
    *parents, last = path.split(".")
    node = raw
    for key in parents:
        node = node[int(key)] if key.isdigit() else node[key]
    node[last] = value
    with pytest.raises(SpecError) as e:
        validate_spec(raw, "hostile.yaml")
    assert any(p.startswith(path) and why in p for p in e.value.problems), e.value.problems


def test_a_number_yaml_reads_as_a_string_is_still_a_number():
    """YAML 1.1 reads 3e-4 (no dot) as a string: that one coercion stays."""
    import copy

    import yaml

    from branchout.orchestrator.config.loader import validate_spec

    from conftest import TINY

    raw = copy.deepcopy(TINY)
    raw["pretrain"]["optimizer"]["lr"] = yaml.safe_load("lr: 3e-4")["lr"]
    assert raw["pretrain"]["optimizer"]["lr"] == "3e-4"
    assert validate_spec(raw, "t.yaml").pretrain.optimizer.lr == 3e-4


@pytest.mark.parametrize(("url", "masked", "forwarded"), [
    ("postgresql://u:PW@h/db?sslpassword=SECRET&application_name=b",
     "postgresql://u:***@h/db?sslpassword=***&application_name=b", "postgresql://u@h/db?application_name=b"),
    ("postgresql://u@h/db?password=SECRET&sslmode=require",
     "postgresql://u@h/db?password=***&sslmode=require", "postgresql://u@h/db?sslmode=require"),
])
def test_a_registry_url_loses_its_query_secrets_too(url, masked, forwarded):
    """Before: ?password= in the registry URL went verbatim into the job's runtime_env and
    the scheduler's start-up line."""
    from branchout.orchestrator.operate.secrets import mask, without_password

    assert mask(url) == masked and without_password(url) == forwarded


@pytest.mark.parametrize(("requirement", "secret"), [
    ("git+https://u:TOKEN@github.com/org/pkg", True), ("git+https://TOKEN@github.com/org/pkg", True),
    ("pkg @ https://TOKEN@host/pkg.whl", True), ("https://host/pkg.whl?token=TOKEN", True),
    ("git+ssh://git@github.com/org/pkg", False), ("git+https://github.com/org/pkg@v1.0", False),
    ("torch==2.13.0", False),
])
def test_pip_requirements_with_credentials_are_recognised(requirement, secret):
    from branchout.orchestrator.config.checks import requirement_has_credentials

    assert requirement_has_credentials(requirement) is secret


def test_submit_refuses_a_pip_requirement_with_a_token_without_echoing_it(write_pipeline):
    result = CliRunner().invoke(app, ["submit", str(write_pipeline()), "--address", "http://127.0.0.1:9",
                                      "--pip", "torch", "--pip", "git+https://u:TOPSECRET@github.com/org/pkg"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: --pip #2: the requirement embeds credentials")
    assert "TOPSECRET" not in result.output


def test_free_form_settings_named_like_secrets_are_refused():
    """Before: deepspeed.config.comet.api_key reached spec.yaml, the job environment and MLflow params."""
    import copy

    from branchout.orchestrator.config.loader import SpecError, validate_spec

    from conftest import TINY

    raw = copy.deepcopy(TINY)
    raw["pretrain"]["deepspeed"]["config"] = {"comet": {"enabled": True, "api_key": "TOPSECRET"}}
    with pytest.raises(SpecError) as e:
        validate_spec(raw, "t.yaml")
    assert e.value.problems == ["pretrain.deepspeed.config.comet.api_key: a setting named like a secret, which would "
                                "be written into spec.yaml, the job's environment and tracking params; give it "
                                "through the environment of the workers instead"]


def test_the_registry_password_file_is_read_not_forwarded(tmp_path, monkeypatch):
    """Documented before, never implemented: BRANCHOUT_REGISTRY_PASSWORD_FILE."""
    from branchout.orchestrator.operate.registry import RegistryConfigError, _engine

    secret = tmp_path / "pgpass"
    secret.write_text("s3cr3t\n")
    monkeypatch.setenv("BRANCHOUT_REGISTRY_PASSWORD_FILE", str(secret))
    assert _engine("postgresql+psycopg2://branchout@127.0.0.1:9/registry").url.password == "s3cr3t"
    monkeypatch.setenv("BRANCHOUT_REGISTRY_PASSWORD_FILE", str(tmp_path / "missing"))
    with pytest.raises(RegistryConfigError, match="BRANCHOUT_REGISTRY_PASSWORD_FILE: cannot read"):
        _engine("postgresql+psycopg2://branchout@127.0.0.1:9/registry")
