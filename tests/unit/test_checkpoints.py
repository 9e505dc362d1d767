"""Checkpoints: a killed writer, damaged files and sharded (per-rank) checkpoints are detected,
loaders fall back to the previous good checkpoint, and retention never drops the newest good."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from branchout.storage import checkpoint


def _make(path, files: dict[str, bytes]) -> str:
    os.makedirs(path, exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(path, name), "wb") as f:
            f.write(data)
    return str(path)


def _publish(tmp_path, parent, name, payload=b"x" * 1000):
    src = _make(tmp_path / f"src-{name}", {"state.pt": payload, "meta.json": b"{}"})
    checkpoint.publish_dir(src, str(parent / name))


def _flip(path, offset=5):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_fallback_to_previous_good_checkpoint(tmp_path):
    parent = tmp_path / "ckpts"
    for name in ("step_010", "step_020", "step_030"):
        _publish(tmp_path, parent, name)
    _flip(parent / "step_030" / "state.pt")
    os.truncate(parent / "step_020" / "state.pt", 10)
    name, path, skipped = checkpoint.newest_good(str(parent), ["step_010", "step_020", "step_030"])
    assert name == "step_010" and path == str(parent / "step_010")
    assert skipped == [f"{parent}/step_030: state.pt: SHA-256 mismatch (corrupted)",
                       f"{parent}/step_020: state.pt: size 10 != 1000 (truncated?)"]


def test_no_good_checkpoint_is_reported_not_ignored(tmp_path):
    parent = tmp_path / "ckpts"
    _publish(tmp_path, parent, "step_010")
    os.remove(parent / "step_010" / checkpoint.MANIFEST)
    name, path, skipped = checkpoint.newest_good(str(parent), ["step_010"])
    assert name is None and path is None
    assert skipped == [f"{parent}/step_010: MANIFEST.json missing (never finished publishing)"]


def test_sharded_checkpoint_needs_every_rank(tmp_path):
    parent = tmp_path / "ray"
    for name, ranks_done in (("checkpoint_1", 2), ("checkpoint_2", 1)):
        d = parent / name
        for rank in range(2):
            _make(d, {f"zero_pp_rank_{rank}_optim_states.pt": os.urandom(512)})
        for rank in range(ranks_done):  # rank 1 of checkpoint_2 died before its manifest
            scratch = _make(tmp_path / f"{name}-r{rank}", {f"zero_pp_rank_{rank}_optim_states.pt":
                                                           (d / f"zero_pp_rank_{rank}_optim_states.pt").read_bytes()})
            checkpoint.write_rank_manifest(scratch, rank, 2, {"step": 1})
            os.replace(os.path.join(scratch, checkpoint.rank_manifest_name(rank)),
                       d / checkpoint.rank_manifest_name(rank))
    name, _, skipped = checkpoint.newest_good(str(parent), ["checkpoint_1", "checkpoint_2"], world=2)
    assert name == "checkpoint_1"
    assert skipped == [f"{parent}/checkpoint_2: MANIFEST.rank1.json missing (rank 1 never finished writing)"]
    with pytest.raises(checkpoint.CorruptCheckpointError, match="written by 2 workers, this job has 4"):
        checkpoint.fetch_verified(str(parent / "checkpoint_1"), world=4)


def test_retention_keeps_the_newest_good(tmp_path):
    parent = tmp_path / "ckpts"
    names = ["step_1", "step_2", "step_3", "step_4", "step_5"]
    for name in names:
        _publish(tmp_path, parent, name)
    os.truncate(parent / "step_3" / "state.pt", 1)  # damaged
    os.remove(parent / "step_5" / checkpoint.MANIFEST)  # still being written
    deleted = checkpoint.retain(str(parent), names, keep=2)
    assert deleted == ["step_1", "step_3"]
    assert sorted(os.listdir(parent)) == ["step_2", "step_4", "step_5"]
    # even keep=1 with every newer checkpoint damaged never deletes the newest good one
    os.truncate(parent / "step_4" / "state.pt", 1)
    checkpoint.retain(str(parent), ["step_2", "step_4", "step_5"], keep=1)
    assert sorted(os.listdir(parent)) == ["step_2", "step_4", "step_5"]


def test_retention_never_trades_a_good_checkpoint_for_a_same_size_bit_flip(tmp_path):
    parent = tmp_path / "ckpts"
    for name in ("step_1", "step_2"):
        _publish(tmp_path, parent, name)
    with open(parent / "step_2" / "state.pt", "r+b") as f:  # sizes still match the manifest
        f.seek(10)
        byte = f.read(1)
        f.seek(10)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert checkpoint.retain(str(parent), ["step_1", "step_2"], keep=1) == []
    assert sorted(os.listdir(parent)) == ["step_1", "step_2"]
    assert checkpoint.newest_good(str(parent), ["step_1", "step_2"])[0] == "step_1"  # still there to resume


def _sharded(parent, name: str, world: int = 2):
    d = parent / name
    for rank in range(world):
        scratch = _make(parent.parent / f"{name}-r{rank}", {f"zero_pp_rank_{rank}_optim_states.pt": os.urandom(256)})
        checkpoint.write_rank_manifest(scratch, rank, world, {"step": 1})
        os.makedirs(d, exist_ok=True)
        for file in os.listdir(scratch):
            os.replace(os.path.join(scratch, file), d / file)
    return d


def test_each_rank_verifies_only_its_own_shards(tmp_path):
    d = _sharded(tmp_path / "ray", "checkpoint_1")
    with open(d / "zero_pp_rank_1_optim_states.pt", "r+b") as f:  # same size, one byte flipped
        byte = f.read(1)
        f.seek(0)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert checkpoint.rank_problems(str(d), 0, 2) == []
    assert checkpoint.rank_problems(str(d), 1, 2) == ["zero_pp_rank_1_optim_states.pt: SHA-256 mismatch (corrupted)"]
    assert "does not belong to a 4-worker job" in checkpoint.rank_problems(str(d), 1, 4)[0]


def test_retention_walk_without_delete_removes_nothing(tmp_path):
    parent = tmp_path / "ray"
    names = [_sharded(parent, f"checkpoint_{i}").name for i in (1, 2, 3)]
    verdict = lambda uri: all(not checkpoint.rank_problems(uri, r, 2) for r in range(2))  # noqa: E731
    assert checkpoint.retain(str(parent), names, 1, 2, verify=verdict, delete=False) == ["checkpoint_1", "checkpoint_2"]
    assert sorted(os.listdir(parent)) == names  # a rank other than 0 only takes part in the walk
    assert checkpoint.retain(str(parent), names, 1, 2, verify=verdict) == ["checkpoint_1", "checkpoint_2"]
    assert sorted(os.listdir(parent)) == ["checkpoint_3"]


WRITER = """
import os, sys
from branchout.storage.checkpoint import publish_dir
src = sys.argv[1]
os.makedirs(src, exist_ok=True)
for i in range(200):
    with open(os.path.join(src, f"shard_{i:03d}.bin"), "wb") as f:
        f.write(os.urandom(1 << 20))
print("ready", flush=True)
publish_dir(src, sys.argv[2])
print("published", flush=True)
"""


def test_writer_killed_while_publishing_leaves_nothing_loadable(tmp_path):
    parent = tmp_path / "ckpts"
    _publish(tmp_path, parent, "step_010")
    target = parent / "step_020"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "big"), str(target)],
                              stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "ready"
    deadline = time.time() + 30
    while not [p for p in os.listdir(parent) if p.startswith(".tmp-step_020")] and time.time() < deadline:
        time.sleep(0.001)
    writer.send_signal(signal.SIGKILL)  # mid-copy: staging exists, nothing published
    writer.wait()
    assert not target.exists()
    with pytest.raises(checkpoint.CorruptCheckpointError, match="does not exist"):
        checkpoint.fetch_verified(str(target))
    names = sorted(p for p in os.listdir(parent) if p.startswith("step_"))
    assert checkpoint.newest_good(str(parent), names)[0] == "step_010"


def _streamed(publisher, scratch, files: dict[str, bytes]) -> list[int]:
    """Write ``files`` one at a time into ``scratch`` and add each as it is finished; returns
    how many finished files were still on local disk after each add."""
    on_disk = []
    for name, body in files.items():
        with open(os.path.join(scratch, name), "wb") as f:
            f.write(body)
        publisher.add(os.path.join(scratch, name))
        on_disk.append(len(os.listdir(scratch)))
    return on_disk


def test_a_publisher_moves_each_file_as_it_is_added_and_replaces_the_old_copy_last(tmp_path):
    parent = tmp_path / "cache"
    _publish(tmp_path, parent, "packed", payload=b"old" * 100)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    files = {f"{i:05d}-train.bin": bytes([i]) * 4096 for i in range(12)}
    with checkpoint.Publisher(str(parent / "packed"), pending=2) as pub:
        on_disk = _streamed(pub, scratch, files)
        # still the old copy, verifying, until commit
        assert (parent / "packed" / "state.pt").read_bytes() == b"old" * 100
        assert checkpoint.full_problems(str(parent / "packed")) == []
        manifest = pub.commit()
    assert max(on_disk) <= 2  # finished files leave local disk as they are added, not at the end
    assert os.listdir(scratch) == []
    assert sorted(manifest["files"]) == sorted(files)
    assert checkpoint.full_problems(str(parent / "packed")) == []
    assert (parent / "packed" / "00007-train.bin").read_bytes() == bytes([7]) * 4096
    assert sorted(os.listdir(parent)) == ["packed"]  # no staging copy or old copy left beside it


def test_a_publisher_left_without_commit_leaves_the_old_copy_and_nothing_beside_it(tmp_path):
    parent = tmp_path / "cache"
    _publish(tmp_path, parent, "packed", payload=b"old" * 100)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with pytest.raises(RuntimeError, match="worker failed"), checkpoint.Publisher(str(parent / "packed")) as pub:
        _streamed(pub, scratch, {"00000-train.bin": b"new" * 100, "00001-train.bin": b"new" * 100})
        raise RuntimeError("worker failed mid-way")
    assert sorted(os.listdir(parent)) == ["packed"]
    assert (parent / "packed" / "state.pt").read_bytes() == b"old" * 100
    assert checkpoint.full_problems(str(parent / "packed")) == []


def test_a_publisher_copies_when_the_scratch_is_on_another_filesystem(tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    replace = os.replace

    def cross_device(src, dst):  # what rename(2) says across filesystems
        if str(src).startswith(str(scratch)):
            raise OSError(18, "Invalid cross-device link")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", cross_device)
    with checkpoint.Publisher(str(tmp_path / "cache" / "packed")) as pub:
        on_disk = _streamed(pub, scratch, {f"{i:05d}-train.bin": bytes([i]) * 512 for i in range(5)})
        pub.commit()
    assert max(on_disk) <= 2 and os.listdir(scratch) == []
    assert checkpoint.full_problems(str(tmp_path / "cache" / "packed")) == []
    assert (tmp_path / "cache" / "packed" / "00003-train.bin").read_bytes() == bytes([3]) * 512


def _by_ranks(root, world: int, extra: dict | None = None) -> str:
    """A checkpoint written by ``world`` ranks: each its own shard and rank manifest."""
    os.makedirs(root, exist_ok=True)
    for rank in range(world):
        _make(root, {f"shard{rank}.pt": bytes([rank]) * 100})
    for rank in range(world):  # after every shard exists, as ranks publish
        manifest_dir = root / f"rank{rank}"
        _make(manifest_dir, {f"shard{rank}.pt": bytes([rank]) * 100})
        checkpoint.write_rank_manifest(str(manifest_dir), rank, world, extra)
        os.replace(manifest_dir / checkpoint.rank_manifest_name(rank), root / checkpoint.rank_manifest_name(rank))
    return str(root)


def test_the_worker_count_a_checkpoint_was_written_by_is_read_only_from_a_sane_rank0_manifest(tmp_path):
    assert checkpoint.written_world(str(tmp_path / "none")) is None
    assert checkpoint.written_world(_by_ranks(tmp_path / "two", 2, {"step": 40})) == 2
    one = _by_ranks(tmp_path / "one", 1)
    assert checkpoint.written_world(one) == 1
    manifest_path = os.path.join(one, checkpoint.rank_manifest_name(0))
    import json

    with open(manifest_path) as f:
        manifest = json.load(f)
    assert manifest["extra"] == {"rank": 0, "world": 1}
    for world, read in ((1 << 20, 1 << 20), ((1 << 20) + 1, None), (0, None), (True, None), ("2", None), (None, None)):
        with open(manifest_path, "w") as f:
            json.dump({**manifest, "extra": {"rank": 0, "world": world}}, f)
        assert checkpoint.written_world(one) == read, world
    with open(manifest_path, "w") as f:
        json.dump({**manifest, "extra": [2]}, f)
    assert checkpoint.written_world(one) is None
    with open(manifest_path, "w") as f:
        json.dump([2], f)
    assert checkpoint.written_world(one) is None


def test_a_rank_manifest_keeps_what_the_writer_adds(tmp_path):
    two = _by_ranks(tmp_path / "two", 2, {"step": 40})
    manifest = checkpoint.read_manifest(two, checkpoint.rank_manifest_name(1))
    assert manifest["extra"] == {"step": 40, "rank": 1, "world": 2} and list(manifest["files"]) == ["shard1.pt"]


def test_a_resharding_job_accepts_a_checkpoint_of_another_worker_count_only_when_it_says_so(tmp_path):
    parent = tmp_path / "ckpts"
    _by_ranks(parent / "step_20", 2)
    # a 1-worker job: without any_world the 2-rank checkpoint is not this job's
    name, path, skipped = checkpoint.newest_good(str(parent), ["step_20"], world=1)
    assert name is None and "written by 2 workers, this job has 1" in skipped[0]
    name, path, skipped = checkpoint.newest_good(str(parent), ["step_20"], world=1, any_world=True)
    assert name == "step_20" and skipped == []


def test_a_manifest_lists_every_file_but_itself_and_unfinished_temporaries(tmp_path):
    src = _make(tmp_path / "src", {"a.bin": b"1", checkpoint.MANIFEST: b"{}", ".tmp-upload": b"partial"})
    _make(tmp_path / "src" / "sub", {"b.bin": b"22"})
    manifest = checkpoint.build_manifest(src)
    assert sorted(manifest["files"]) == ["a.bin", "sub/b.bin"]
    assert manifest["files"]["sub/b.bin"]["size"] == 2


def test_a_manifest_that_is_not_text_is_invalid_not_an_error(tmp_path):
    path = _make(tmp_path / "ckpt", {"state.pt": b"x", checkpoint.MANIFEST: b"\xff\xfe\x00garbage"})
    assert checkpoint.read_manifest(path) == {"files": None, "invalid": [f"{checkpoint.MANIFEST}: not JSON"]}


def test_manifest_problems_of_shapes_json_cannot_have_and_python_callers_can():
    good = {"size": 1, "sha256": "0" * 64}
    assert checkpoint.manifest_problems([]) == ["no file list"]
    assert checkpoint.manifest_problems({"files": []}) == ["no file list"]
    assert checkpoint.manifest_problems({"files": {5: good}}) == ["member 5 is not a path inside the directory"]
    assert checkpoint.manifest_problems({"files": {"a/b": good}}) == []


def test_every_manifest_is_checked_even_after_an_unreadable_one(tmp_path):
    path = _make(tmp_path / "ckpt", {"a.bin": b"1"})
    problems = checkpoint.verify_local(path, [{"files": None, "invalid": ["MANIFEST.rank0.json: not JSON"]},
                                             {"files": {"b.bin": {"size": 1, "sha256": "0" * 64}}}])
    assert problems == ["MANIFEST.rank0.json: not JSON", "b.bin: missing"]


def test_each_rank_verifies_its_own_shards_on_an_object_store(s3_bucket, tmp_path):
    from branchout import storage

    local = tmp_path / "ckpt"
    _make(local / "zero", {"rank0_a.pt": b"a" * 50, "rank0_b.pt": b"b" * 60})  # two files, one folder
    checkpoint.write_rank_manifest(str(local), 0, 1)
    uri = f"{s3_bucket}/ckpts/step_10"
    storage.upload_dir(str(local), uri)
    assert checkpoint.rank_problems(uri, 0, 1) == []
    storage.write_bytes(storage.join(uri, "zero/rank0_b.pt"), b"B" * 60)  # same size, other bytes
    assert checkpoint.rank_problems(uri, 0, 1) == ["zero/rank0_b.pt: SHA-256 mismatch (corrupted)"]
