"""Publishing to an object store (a real S3 server on loopback): the old copy is replaced
only once the new one is complete, so a failed upload loses nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from branchout import storage
from branchout.storage import checkpoint
from branchout.storage.checkpoint import fetch_verified, publish_dir


def _model(root, text: str) -> str:
    os.makedirs(os.path.join(root, "sub"), exist_ok=True)
    for name, body in (("weights.bin", text * 1000), ("config.json", text), ("sub/extra.txt", text)):
        with open(os.path.join(root, name), "w") as f:
            f.write(body)
    return str(root)


def _read(uri: str, tmp_path, name: str) -> str:
    local = fetch_verified(uri, str(tmp_path / name))
    with open(os.path.join(local, "config.json")) as f:
        return f.read()


def test_a_failed_upload_leaves_the_old_copy_verifying(s3_bucket, tmp_path, monkeypatch):
    uri = f"{s3_bucket}/runs/p/r/pretrain/model"
    publish_dir(_model(tmp_path / "v1", "old"), uri)
    assert _read(uri, tmp_path, "a") == "old"

    real_upload = storage.upload_dir

    def upload_then_die(local_dir, target):
        real_upload(local_dir, target)  # the files arrive, then the worker is killed
        raise KeyboardInterrupt("worker killed mid-publish")

    monkeypatch.setattr(storage, "upload_dir", upload_then_die)
    with pytest.raises(KeyboardInterrupt):
        publish_dir(_model(tmp_path / "v2", "new"), uri)
    assert _read(uri, tmp_path, "b") == "old"  # still there, still verifying
    monkeypatch.setattr(storage, "upload_dir", real_upload)

    publish_dir(_model(tmp_path / "v3", "newer"), uri)
    assert _read(uri, tmp_path, "c") == "newer"
    assert sorted(storage.sizes(uri)) == ["MANIFEST.json", "config.json", "sub/extra.txt", "weights.bin"]
    siblings = storage.listdir(f"{s3_bucket}/runs/p/r/pretrain")
    assert [s for s in siblings if "staging" in s] == []  # nothing left beside it


def test_an_incomplete_upload_is_refused_before_the_old_copy_goes(s3_bucket, tmp_path, monkeypatch):
    uri = f"{s3_bucket}/runs/p/r/finetune/legal/model"
    publish_dir(_model(tmp_path / "v1", "old"), uri)
    real_sizes = storage.sizes
    # the store lists a file shorter than the manifest says (a truncated multipart upload)
    monkeypatch.setattr(storage, "sizes", lambda u: {**real_sizes(u), "weights.bin": 7} if "staging" in u
                        else real_sizes(u))
    with pytest.raises(checkpoint.CorruptCheckpointError, match=r"upload incomplete: weights.bin: 7 bytes of 3000"):
        publish_dir(_model(tmp_path / "v2", "new"), uri)
    monkeypatch.setattr(storage, "sizes", real_sizes)
    assert _read(uri, tmp_path, "a") == "old"


def test_a_publisher_uploads_files_as_they_are_added_and_publishes_on_commit(s3_bucket, tmp_path):
    """The data stage's path: shards go to the store as they fill, so the writer's disk never
    holds the packed set; the old copy verifies until commit, and a failure leaves it so."""
    uri = f"{s3_bucket}/cache/data/key"
    publish_dir(_model(tmp_path / "v1", "old"), uri)

    def stream(pub, names, scratch):
        scratch.mkdir()
        for name in names:
            (scratch / name).write_bytes(name.encode() * 500)
            pub.add(str(scratch / name))
            assert len(os.listdir(scratch)) <= pub.pending

    with pytest.raises(RuntimeError), checkpoint.Publisher(uri) as pub:
        stream(pub, ["00000-train.bin", "00001-train.bin", "00002-train.bin"], tmp_path / "scratch-1")
        raise RuntimeError("worker failed mid-way")
    assert _read(uri, tmp_path, "a") == "old"
    staged = [s for s in storage.listdir(f"{s3_bucket}/cache/data") if "staging" in s]
    assert staged == []  # the partial upload is removed

    with checkpoint.Publisher(uri) as pub:
        stream(pub, [f"{i:05d}-train.bin" for i in range(6)], tmp_path / "scratch-2")
        assert _read(uri, tmp_path, "b") == "old"
        pub.commit()
    assert sorted(storage.sizes(uri)) == [*[f"{i:05d}-train.bin" for i in range(6)], "MANIFEST.json"]
    local = fetch_verified(uri, str(tmp_path / "c"))
    assert Path(local, "00004-train.bin").read_bytes() == b"00004-train.bin" * 500
    assert [s for s in storage.listdir(f"{s3_bucket}/cache/data") if "staging" in s] == []
    assert os.listdir(tmp_path / "scratch-2") == []
