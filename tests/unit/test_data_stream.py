"""The streaming data stage without Ray: read units, byte-identical packing, lazy shard reads,
the shard-aware block order, the tokenizer's bounded sample, bad input as one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from branchout.core.spec import DatasetSpec
from branchout.stages.job import DataJob
from branchout.stages.prepare import data, packing
from branchout.stages.prepare.documents import iter_documents, split_paragraphs
from branchout.stages.prepare.tokenizer import tokenizer_hash
from branchout.stages.training.batches import BlockOrder, step_micro_batches
from branchout.storage.checkpoint import CorruptCheckpointError


def test_documents_do_not_depend_on_the_unit_size(tmp_path):
    rng = np.random.default_rng(0)
    docs = [f"doc {i} " + "word " * int(rng.integers(0, 60)) for i in range(800)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    separators = ["\n\n", "\n\n\n", "\n  \n", "\r\n\r\n", "\n \t\n\n"]
    text = "".join(f"para {i}\n  line two {i}{separators[i % 5]}" for i in range(800))
    (tmp_path / "t.txt").write_bytes(text.encode())
    for name, want in (("a.jsonl", docs), ("t.txt", split_paragraphs(text))):
        for unit_bytes in (1 << 30, 4096, 333, 17):
            assert list(iter_documents(DatasetSpec(path=str(tmp_path / name)), unit_bytes)) == want, (name, unit_bytes)


def test_packing_is_identical_across_unit_sizes_batch_sizes_and_runs(corpus_dir, tokenizer_dir, tmp_path,
                                                                   monkeypatch):
    ds = DatasetSpec(path=str(corpus_dir / "legal.jsonl"))
    h = tokenizer_hash(tokenizer_dir)
    runs = []
    for i, (unit_bytes, encode_docs) in enumerate([(1 << 30, 1000), (5_000, 7), (1 << 30, 1000)]):
        monkeypatch.setattr(packing, "ENCODE_DOCS", encode_docs)
        info = data.prepare(DataJob(dataset=ds, tokenizer_uri=tokenizer_dir, tokenizer_hash=h, seq_len=16,
                                    heldout_fraction=0.2, split_seed=0, cache_root=str(tmp_path / f"c{i}")), unit_bytes=unit_bytes, shard_blocks=64)
        manifest = json.loads((tmp_path / f"c{i}" / info.uri.rsplit("/", 1)[1] / "MANIFEST.json").read_text())
        runs.append({k: v["sha256"] for k, v in manifest["files"].items()})
    assert len(runs[0]) > 4  # several shards per side, the shingle set, meta.json
    assert runs[0] == runs[1] == runs[2]


def test_the_last_units_are_cut_small_and_the_output_does_not_change(corpus_dir, tokenizer_dir, tmp_path,
                                                                     monkeypatch):
    from branchout.stages.prepare import documents
    from branchout.stages.prepare.documents import plan_units, taper

    monkeypatch.setattr(documents, "TAPER_MIN_BYTES", 16 << 10)  # the real floor (256 KB) needs a ~10 MB file
    small = documents.TAPER_MIN_BYTES
    big = tmp_path / "big.jsonl"  # ~2 MB
    big.write_text((corpus_dir / "legal.jsonl").read_text() * -(-2_000_000 // (corpus_dir / "legal.jsonl").stat().st_size))
    ds = DatasetSpec(path=str(big))
    units = plan_units(ds, 300_000)
    cut = taper(units, workers=2)
    head = len(units) - 4  # the last 2 × 2 units are cut
    tail = cut[head:]
    assert len(units) > 5 and cut[:head] == units[:head] and len(tail) > 12
    assert all(a.stop == b.start for a, b in zip(cut, cut[1:], strict=False))  # contiguous, every byte once
    assert cut[0].start == 0 and cut[-1].stop == big.stat().st_size
    # guided: the first piece is an eighth of the tail's work (1 / (4 × workers)), the last ones the floor
    assert tail[0].size <= sum(u.size for u in units[head:]) // 8 + small
    assert all(p.size <= 2 * small for p in tail[-4:])
    ends = {u.stop for u in units}  # a unit's last piece is its remainder; the others only shrink
    inner = [p.size for p in tail if p.stop not in ends]
    assert inner == sorted(inner, reverse=True)
    assert taper(units, workers=1) == units  # one worker: no last wave to balance

    h = tokenizer_hash(tokenizer_dir)
    digests = []
    for i, workers in enumerate((1, 2)):
        monkeypatch.setattr(data, "cluster_cpus", lambda w=workers: w)  # taper as on a 2-CPU cluster, in process
        info = data.prepare(DataJob(dataset=ds, tokenizer_uri=tokenizer_dir, tokenizer_hash=h, seq_len=16,
                                    heldout_fraction=0.2, split_seed=0, cache_root=str(tmp_path / f"c{i}")), unit_bytes=300_000)
        digests.append(json.loads((tmp_path / f"c{i}" / info.uri.rsplit("/", 1)[1] / "MANIFEST.json").read_text()))
    assert digests[0]["files"] == digests[1]["files"]


@pytest.fixture(scope="module")
def sharded(corpus_dir, tokenizer_dir, tmp_path_factory):
    """The general corpus packed into 8-token blocks, 32 blocks a shard: ~200 shards."""
    root = tmp_path_factory.mktemp("sharded")
    info = data.prepare(DataJob(dataset=DatasetSpec(path=str(corpus_dir / "general.jsonl")),
                                tokenizer_uri=tokenizer_dir, tokenizer_hash=tokenizer_hash(tokenizer_dir),
                                seq_len=8, heldout_fraction=0.1, split_seed=0, cache_root=str(root)), shard_blocks=32)
    return info


def test_a_rank_reads_only_the_shards_its_blocks_come_from(sharded):
    world, micro, global_batch = 4, 2, 16
    blocks = data.open_blocks(sharded.uri, "train")
    order = BlockOrder(len(blocks), seed=3, shard_blocks=32)
    n_shards = -(-len(blocks) // 32)
    assert order.sharded and n_shards > 40
    steps = len(blocks) // global_batch  # one epoch
    seen = []
    for step in range(steps):
        for idx in step_micro_batches(order, step, global_batch, micro, rank=1, world=world):
            seen.append(idx)
            blocks[np.sort(idx)]
    assert len(set(blocks.opened)) == len(blocks.opened)  # each shard fetched and verified once
    accum = global_batch // (micro * world)  # the rank's lanes: each may start and end inside a window
    assert len(blocks.opened) <= n_shards / world + 2 * accum * order.window, (len(blocks.opened), n_shards)
    everything = np.asarray(data.open_blocks(sharded.uri, "train"))
    idx = np.concatenate(seen)
    assert (blocks[idx] == everything[idx]).all() and len(np.unique(idx)) == len(idx)


def test_shard_aware_order_is_a_pure_function_and_ranks_are_disjoint():
    a, b = BlockOrder(1000, 5, shard_blocks=64), BlockOrder(1000, 5, shard_blocks=64)
    per_rank = [np.concatenate([m for s in range(31) for m in step_micro_batches(a, s, 32, 2, r, 4)])
                for r in range(4)]
    assert sum(map(len, per_rank)) == len(np.unique(np.concatenate(per_rank))) == 31 * 32
    assert (step_micro_batches(a, 40, 32, 2, 2, 4)[3] == step_micro_batches(b, 40, 32, 2, 2, 4)[3]).all()
    for step in (0, 7, 40):  # any worker count reads the same samples at a step: resharding skips nothing
        one = np.concatenate(step_micro_batches(a, step, 32, 2, 0, 1))
        for world in (2, 4, 8):
            many = np.concatenate([m for r in range(world) for m in step_micro_batches(a, step, 32, 2, r, world)])
            assert sorted(many) == sorted(one)
    assert sorted(a.blocks(0, 1000).tolist()) == list(range(1000))  # an epoch visits every block once
    legacy = BlockOrder(10, 3)  # one shard: the plain permutation, as before shards existed
    assert legacy.blocks(0, 10).tolist() == np.random.default_rng([3, 0]).permutation(10).tolist()


def test_a_corrupted_shard_fails_when_read_and_names_itself(sharded, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(sharded.uri, copy)
    with open(copy / "00002-train.bin", "r+b") as f:
        f.seek(5)
        f.write(b"\xff")
    blocks = data.open_blocks(str(copy), "train")
    assert blocks[0:3].shape == (3, 8)  # shard 0 is fine
    with pytest.raises(CorruptCheckpointError, match="00002-train.bin: SHA-256 mismatch"):
        blocks[2 * 32 + 1]


def test_tokenizer_trains_on_a_bounded_seeded_sample_of_training_documents(corpus_dir):
    from branchout.stages.prepare.split import is_heldout
    from branchout.stages.prepare.tokenizer import sample_texts

    ds = DatasetSpec(path=str(corpus_dir / "general.jsonl"))
    sample = list(sample_texts(ds, 20_000, 0.2, 0))
    longest = max(len(t.encode()) for t in iter_documents(ds))
    assert 0 < sum(len(t.encode()) for t in sample) <= 20_000 + longest
    assert sample == list(sample_texts(ds, 20_000, 0.2, 0)) != list(sample_texts(ds, 20_000, 0.2, 1))
    assert not any(is_heldout(t, 0, 0.2) for t in sample)
    everything = [t for t in iter_documents(ds) if not is_heldout(t, 0, 0.2)]
    assert list(sample_texts(ds, 10**9, 0.2, 0)) == everything  # a small corpus: all of it


def test_unreadable_input_is_one_line_naming_the_file_and_line(tokenizer_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"text": f"fine line {i} " * 20}) + "\n" for i in range(500))
                   + '{"text": "broken\n')
    with pytest.raises(data.DataError) as e:
        data.prepare(DataJob(dataset=DatasetSpec(path=str(bad)), tokenizer_uri=tokenizer_dir,
                             tokenizer_hash="h", seq_len=16, heldout_fraction=0.2, split_seed=0,
                             cache_root=str(tmp_path / "c")), unit_bytes=4096)
    assert str(e.value).startswith(f"{bad}: line 501, column 10: not valid JSON") and "\n" not in str(e.value)


def test_an_unreachable_hub_dataset_is_one_line():
    with pytest.raises(data.DataError, match=r"^wikitext: hub dataset unreachable \(.*\); check the network"):
        data.fingerprint(DatasetSpec(path="wikitext", format="hub"))
