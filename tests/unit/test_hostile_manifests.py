"""Manifests read from storage are data anyone with write access to the bucket could have
written: their member names must not reach outside their directory, and their hashes must not
become arbitrary file names (issue 32). Each case was a path out of the checkpoint before."""

from __future__ import annotations

import json
import os

import pytest

from branchout import storage
from branchout.storage.checkpoint import (
    MANIFEST,
    CorruptCheckpointError,
    fetch_verified,
    manifest_problems,
    rank_manifest_name,
    rank_problems,
)

GOOD_HASH = "0" * 64
HOSTILE = [
    ({"/tmp/branchout-pwned": {"size": 1, "sha256": GOOD_HASH}}, "is not a path inside the directory"),
    ({"../../branchout-pwned": {"size": 1, "sha256": GOOD_HASH}}, "is not a path inside the directory"),
    ({"ok/../../x": {"size": 1, "sha256": GOOD_HASH}}, "is not a path inside the directory"),
    ({"a\\..\\..\\x": {"size": 1, "sha256": GOOD_HASH}}, "is not a path inside the directory"),
    ({"a\x00b": {"size": 1, "sha256": GOOD_HASH}}, "is not a path inside the directory"),
    ({"": {"size": 1, "sha256": GOOD_HASH}}, "is not a path inside the directory"),
    ({"w.bin": {"size": 1, "sha256": "../../../etc/cron.d/x"}}, "has no valid SHA-256"),
    ({"w.bin": {"size": 1, "sha256": "A" * 64}}, "has no valid SHA-256"),
    ({"w.bin": {"size": -1, "sha256": GOOD_HASH}}, "has no valid size"),
    ({"w.bin": {"size": True, "sha256": GOOD_HASH}}, "has no valid size"),
    ({"w.bin": "nope"}, "has no valid size"),
]


@pytest.mark.parametrize(("files", "why"), HOSTILE)
def test_a_hostile_manifest_is_refused_before_any_member_is_touched(files, why):
    assert any(why in p for p in manifest_problems({"files": files}))


def test_a_good_manifest_passes():
    assert manifest_problems({"files": {"a/b.bin": {"size": 0, "sha256": GOOD_HASH}}}) == []


def _plant(directory, name: str, files: dict) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, name), "w") as f:
        json.dump({"files": files, "extra": {"rank": 0, "world": 1}}, f)


def test_a_rank_manifest_on_an_object_store_cannot_write_outside_its_temp_folder(s3_bucket, tmp_path):
    """Before: rank_problems downloaded each listed member to os.path.join(tmp, rel), so an
    absolute member name wrote anywhere on the worker."""
    target = tmp_path / "outside" / "pwned.txt"
    local = tmp_path / "ckpt"
    _plant(local, rank_manifest_name(0), {str(target): {"size": 5, "sha256": GOOD_HASH}})
    uri = f"{s3_bucket}/hostile/step_1"
    storage.upload_dir(str(local), uri)
    storage.write_text(storage.join(uri, str(target).lstrip("/")), "owned")  # the member, where S3 keys put it
    problems = rank_problems(uri, 0, 1)
    assert any("is not a path inside the directory" in p for p in problems), problems
    assert not target.exists()


def test_a_local_published_directory_with_a_hostile_manifest_does_not_verify(tmp_path):
    """Before: verification read (and sized) files outside the directory."""
    secret = tmp_path / "secret.txt"
    secret.write_text("x")
    _plant(tmp_path / "model", MANIFEST, {str(secret): {"size": 1, "sha256": GOOD_HASH}})
    with pytest.raises(CorruptCheckpointError, match="is not a path inside the directory"):
        fetch_verified(str(tmp_path / "model"))


def test_packed_data_whose_manifest_names_a_path_as_a_hash_is_refused(tmp_path):
    """Before: the block cache used a manifest's sha256 value as a file name."""
    from branchout.stages.prepare.blocks import fetch_member

    _plant(tmp_path / "packed", MANIFEST, {"train.bin": {"size": 1, "sha256": "../../../../tmp/evil"}})
    with pytest.raises(CorruptCheckpointError, match="has no valid SHA-256"):
        fetch_member(str(tmp_path / "packed"), "train.bin")


def test_a_failed_local_publish_leaves_no_staging_copy(tmp_path, monkeypatch):
    """Before: a publish that failed after copying left a .tmp-<name>-* folder beside it."""
    from branchout.storage import checkpoint

    src = tmp_path / "src"
    src.mkdir()
    (src / "w.bin").write_bytes(b"x" * 10)

    def broken(path):
        raise OSError("disk went away")

    monkeypatch.setattr(checkpoint, "_fsync_path", broken)
    with pytest.raises(OSError, match="disk went away"):
        checkpoint.publish_dir(str(src), str(tmp_path / "out" / "model"))
    assert os.listdir(tmp_path / "out") == []


def test_staging_copies_left_by_killed_writers_are_swept(tmp_path):
    from branchout.storage.checkpoint import STALE_STAGING_S, publish_dir

    src = tmp_path / "src"
    src.mkdir()
    (src / "w.bin").write_bytes(b"x")
    out = tmp_path / "out"
    stale, fresh = out / ".tmp-model-dead0001", out / ".tmp-model-live0002"
    for d in (stale, fresh):
        d.mkdir(parents=True)
    old = os.path.getmtime(stale) - STALE_STAGING_S - 1
    os.utime(stale, (old, old))
    publish_dir(str(src), str(out / "model"))
    assert sorted(os.listdir(out)) == [".tmp-model-live0002", "model"]  # a live writer's copy is left alone


def test_republishing_a_directory_swaps_it_in_one_step(tmp_path, monkeypatch):
    """Before: the old copy was renamed aside and the new one renamed in, two steps; a crash
    between them left nothing at the path. Where the system can swap (Linux), it does."""
    from branchout.storage import checkpoint

    src = tmp_path / "src"
    src.mkdir()
    (src / "w.bin").write_text("old")
    dst = tmp_path / "out" / "model"
    checkpoint.publish_dir(str(src), str(dst))
    (src / "w.bin").write_text("new")
    renames: list[tuple[str, str]] = []
    real = os.replace
    monkeypatch.setattr(checkpoint.os, "replace", lambda a, b: (renames.append((a, b)), real(a, b))[1])
    checkpoint.publish_dir(str(src), str(dst))
    assert (dst / "w.bin").read_text() == "new"
    assert os.listdir(tmp_path / "out") == ["model"]  # the old copy is gone, nothing left beside it
    (tmp_path / "p1").mkdir()
    (tmp_path / "p2").mkdir()
    if checkpoint.exchange(str(tmp_path / "p1"), str(tmp_path / "p2")):  # this system swaps
        assert not [r for r in renames if r[0] == str(dst)], renames  # the old copy never left dst by a rename
