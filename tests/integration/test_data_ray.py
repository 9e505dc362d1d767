"""The data stage on Ray: byte-identical to the single-process path, several datasets at once
on a 2-CPU cluster without deadlock, progress on the run's hub, bad input as one line; and a
reader on object storage that downloads only the shards it touches."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from branchout.core.spec import DatasetSpec
from branchout.stages.job import DataJob
from branchout.stages.prepare import data
from branchout.stages.prepare.tokenizer import tokenizer_hash

from conftest import local_ray


@pytest.fixture(scope="module")
def ray_local():
    with local_ray("test-data") as ray:
        yield ray


def _digests(uri: str) -> dict[str, str]:
    manifest = json.loads(Path(uri, "MANIFEST.json").read_text())
    return {name: f["sha256"] for name, f in manifest["files"].items()}


def test_ray_data_path_is_byte_identical_and_datasets_run_at_once(ray_local, corpus_dir, tokenizer_dir, tmp_path):
    from branchout.core.progress import hub_name, start_hub

    ray = ray_local
    h = tokenizer_hash(tokenizer_dir)
    hub = start_hub("test-data")
    task = ray.remote(data.prepare).options(num_cpus=0)  # as the driver submits it
    names = ("general", "legal", "code")
    refs = [task.remote(DataJob(dataset=DatasetSpec(path=str(corpus_dir / f"{n}.jsonl")), tokenizer_uri=tokenizer_dir,
                                tokenizer_hash=h, seq_len=16, heldout_fraction=0.2, split_seed=0,
                                cache_root=str(tmp_path / "ray"), name=f"data/{n}", hub_name=hub_name("test-data")),
                        unit_bytes=8_000)
            for n in names]
    infos = ray.get(refs, timeout=300)  # three pipelines on 2 CPUs: all finish
    assert all(info.nodes == 1 for info in infos)
    for name, info in zip(names, infos, strict=True):
        local = data.prepare(DataJob(dataset=DatasetSpec(path=str(corpus_dir / f"{name}.jsonl")),
                                     tokenizer_uri=tokenizer_dir, tokenizer_hash=h, seq_len=16,
                                     heldout_fraction=0.2, split_seed=0, cache_root=str(tmp_path / "local")))
        assert _digests(info.uri) == _digests(local.uri), name
    # the hub is updated fire-and-forget: wait for the last update to land, not for a fixed time
    deadline = time.time() + 60
    while (progress := ray.get(hub.snapshot.remote()).get("data/general", {})).get("tokens") != infos[0].tokens:
        assert time.time() < deadline, progress
        time.sleep(0.1)
    assert progress["tokens"] == infos[0].tokens and progress["docs"] > 0
    assert progress["tokens_per_s"] > 0 and progress["eta_s"] is not None


def test_bad_input_in_a_ray_task_is_one_line(ray_local, tokenizer_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"text": f"line {i} " * 30}) + "\n" for i in range(300)) + "[1, 2]\n")
    task = ray_local.remote(data.prepare).options(num_cpus=0, max_retries=0)
    with pytest.raises(data.DataError) as e:
        ray_local.get(task.remote(DataJob(dataset=DatasetSpec(path=str(bad)), tokenizer_uri=tokenizer_dir,
                                          tokenizer_hash="h", seq_len=16, heldout_fraction=0.2, split_seed=0,
                                          cache_root=str(tmp_path / "c")), unit_bytes=4096))
    assert f"{bad}: line 301 is a JSON list, expected an object" in str(e.value)


def test_a_reader_on_object_storage_downloads_only_the_shards_it_reads(s3_bucket, corpus_dir, tokenizer_dir,
                                                                    tmp_path):
    import numpy as np

    info = data.prepare(DataJob(dataset=DatasetSpec(path=str(corpus_dir / "general.jsonl")),
                                tokenizer_uri=tokenizer_dir, tokenizer_hash=tokenizer_hash(tokenizer_dir),
                                seq_len=8, heldout_fraction=0.1, split_seed=0, cache_root=f"{s3_bucket}/cache"),
                        shard_blocks=64)
    assert info.uri.startswith("s3://")
    cache = tmp_path / "shards"
    blocks = data.open_blocks(info.uri, "train", local_dir=str(cache))
    n_shards = -(-len(blocks) // 64)
    picked = blocks[np.array([3, 64 * 5 + 1, 2])]
    assert picked.shape == (3, 8) and n_shards > 10
    assert sorted(os.listdir(cache)) == ["00000-train.bin", "00005-train.bin"]
    local = data.prepare(DataJob(dataset=DatasetSpec(path=str(corpus_dir / "general.jsonl")),
                                 tokenizer_uri=tokenizer_dir, tokenizer_hash=tokenizer_hash(tokenizer_dir),
                                 seq_len=8, heldout_fraction=0.1, split_seed=0,
                                 cache_root=str(tmp_path / "local")), shard_blocks=64)
    assert (picked == np.asarray(data.open_blocks(local.uri, "train"))[[3, 64 * 5 + 1, 2]]).all()
