"""Shipping a submitted run's local inputs (orchestrator/operate/inputs.py) and the storage probe."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from branchout.orchestrator.config.loader import load_spec
from branchout.orchestrator.operate import inputs
from branchout.orchestrator.operate.inputs import ShippingError, ship_inputs
from branchout.storage.checkpoint import fetch_verified

from conftest import TINY, run_cli


def _spec(write_pipeline, storage: str, **tokenizer):
    spec = copy.deepcopy(TINY)
    spec["tokenizer"].update(tokenizer)
    return load_spec(write_pipeline(spec, storage=storage))


def test_shared_storage_gets_each_input_once_by_content(write_pipeline, tmp_path, corpus_dir):
    spec = _spec(write_pipeline, f"file://{tmp_path / 'shared'}")
    first = ship_inputs(spec)
    path = first.spec.finetune.domains[0].dataset.path
    assert path.startswith(f"{tmp_path / 'shared'}/inputs/sha256-") and path.endswith("/legal.jsonl")
    assert Path(path).read_bytes() == (corpus_dir / "legal.jsonl").read_bytes()
    fetch_verified(path.rsplit("/", 1)[0])  # published with a manifest readers verify
    assert spec.finetune.domains[0].dataset.path == str(corpus_dir / "legal.jsonl")  # the caller's spec is untouched
    second = ship_inputs(spec)
    assert second.spec.finetune.domains[0].dataset.path == path  # same content, same place
    assert all(line.endswith("(already uploaded)") for line in second.lines) and len(second.lines) == 4


def test_directories_and_globs_ship_as_folders(write_pipeline, tmp_path, corpus_dir):
    (tmp_path / "shards").mkdir()
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / "shards" / name).write_bytes((corpus_dir / "code.jsonl").read_bytes())
    spec = copy.deepcopy(TINY)
    spec["finetune"]["domains"][1]["dataset"]["path"] = str(tmp_path / "shards" / "*.jsonl")
    spec["finetune"]["domains"][2]["dataset"]["path"] = str(tmp_path / "shards")
    shipped = ship_inputs(load_spec(write_pipeline(spec, storage=f"file://{tmp_path / 's'}"))).spec
    for d in shipped.finetune.domains[1:]:
        folder = d.dataset.path
        assert sorted(p.name for p in (tmp_path / "s" / "inputs").joinpath(folder.rsplit("/", 1)[1]).iterdir()) \
            == ["MANIFEST.json", "a.jsonl", "b.jsonl"]


def test_plain_local_storage_ships_small_inputs_in_the_job(write_pipeline, tmp_path):
    shipment = ship_inputs(_spec(write_pipeline, str(tmp_path / "runs")))
    path = shipment.spec.pretrain.dataset.path
    assert path.startswith("branchout-inputs/sha256-") and (tmp_path / shipment.working_dir / path).is_file()
    with pytest.raises(ShippingError, match="--working-dir is taken"):
        ship_inputs(_spec(write_pipeline, str(tmp_path / "runs")), user_working_dir=str(tmp_path))


def test_large_inputs_need_shared_storage(write_pipeline, tmp_path, monkeypatch):
    monkeypatch.setattr(inputs, "MAX_JOB_FILES_BYTES", 1000)
    with pytest.raises(ShippingError) as e:
        ship_inputs(_spec(write_pipeline, str(tmp_path / "runs")))
    assert str(e.value).startswith("pretrain.dataset.path: the local inputs hold ")
    assert "set storage to s3://…, gs://… or a shared file:///… mount" in str(e.value)


def test_probe_refuses_storage_the_node_does_not_share(tmp_path):
    out = run_cli("probe", f"file://{tmp_path}", "0123456789ab")
    assert out.returncode == 2
    assert "does not see what the submitting machine wrote" in out.stderr
    (tmp_path / ".probes").mkdir()
    (tmp_path / ".probes" / "0123456789ab").write_text("0123456789ab")
    assert run_cli("probe", f"file://{tmp_path}", "0123456789ab").returncode == 0


def test_a_shipped_directory_leaves_secrets_vcs_and_ignored_files_behind(write_pipeline, tmp_path, corpus_dir):
    """Before: submit copied whole input directories, .env and .git/ included (issue 32)."""
    shards = tmp_path / "shards"
    (shards / ".git").mkdir(parents=True)
    (shards / ".git" / "config").write_text("[remote] url = https://user:TOKEN@host/repo")
    (shards / ".env").write_text("AWS_SECRET_ACCESS_KEY=SECRET")
    (shards / "server.pem").write_text("-----BEGIN PRIVATE KEY-----")
    (shards / "scratch").mkdir()
    (shards / "scratch" / "tmp.jsonl").write_text("{}")
    (shards / ".gitignore").write_text("# local work\nscratch/\n*.bak\n")
    (shards / "old.jsonl.bak").write_text("{}")
    (shards / "a.jsonl").write_bytes((corpus_dir / "code.jsonl").read_bytes())
    spec = copy.deepcopy(TINY)
    spec["finetune"]["domains"][1]["dataset"]["path"] = str(shards)
    shipped = ship_inputs(load_spec(write_pipeline(spec, storage=f"file://{tmp_path / 's'}"))).spec
    folder = Path(shipped.finetune.domains[1].dataset.path)
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == [
        ".gitignore", "MANIFEST.json", "a.jsonl"]


def test_secrets_and_vcs_folders_are_never_shippable():
    from branchout.orchestrator.operate.inputs import shippable

    for secret in (".env", "conf/.env.production", ".git/config", "keys/id_rsa", "tls/server.pem", ".netrc",
                   ".aws/credentials"):
        assert not shippable(secret), secret
    for kept in ("data/train.jsonl", "model/config.json", "environment.yaml", "README.md"):
        assert shippable(kept), kept
