"""Small pure pieces: block order, LR schedule, states, checkpoints, plan memory, corpus."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from branchout.core.spec import ScheduleSpec
from branchout.orchestrator.run.state import (
    IllegalTransitionError,
    JobState,
    RunRecord,
    RunState,
)
from branchout.stages.training.batches import BlockOrder, step_micro_batches
from branchout.stages.training.optim import lr_lambda
from branchout.storage import checkpoint


def test_block_order_visits_every_block_once_per_epoch():
    order = BlockOrder(10, seed=3)
    assert sorted(order.blocks(0, 10).tolist()) == list(range(10))
    assert sorted(order.blocks(10, 10).tolist()) == list(range(10))
    assert order.blocks(0, 10).tolist() != order.blocks(10, 10).tolist()
    assert order.blocks(5, 10).tolist() == BlockOrder(10, 3).blocks(5, 10).tolist()


def test_block_order_edges_and_the_shard_aware_sequence():
    """The order's edge cases, read directly (mutation testing found them unchecked)."""
    from branchout.stages.training.batches import WINDOW_SHARDS, epochs_for

    with pytest.raises(ValueError, match="no blocks to train on"):
        BlockOrder(0, seed=1)
    assert BlockOrder(1, seed=1).blocks(0, 3).tolist() == [0, 0, 0]  # one block: every epoch is it
    # one shard: the plain permutation of each epoch, drawn from (seed, epoch)
    one = BlockOrder(10, seed=3)
    assert not one.sharded
    assert one.blocks(0, 20).tolist() == [*np.random.default_rng([3, 0]).permutation(10),
                                          *np.random.default_rng([3, 1]).permutation(10)]
    # shards exactly filled: 8 shards of 32, never a ninth
    order = BlockOrder(256, seed=5, shard_blocks=32)
    assert order.sharded and order.n_shards == 8 and BlockOrder(64, 5, shard_blocks=32).sharded
    # an epoch of the windowed sequence: every block once, each window from its own 4 shards
    epoch = order.blocks(0, 256)
    assert sorted(epoch.tolist()) == list(range(256))
    window = WINDOW_SHARDS * 32
    for w in range(0, 256, window):
        assert len(set((epoch[w:w + window] // 32).tolist())) == WINDOW_SHARDS
    assert sorted(order.blocks(256, 256).tolist()) == list(range(256)) and not (order.blocks(256, 256) == epoch).all()
    # lanes: each a contiguous 1/lanes of the epoch's sequence, together every block once
    lanes = 8
    read = np.concatenate([order.rank_blocks(lane, lanes, 0, 256 // lanes) for lane in range(lanes)])
    assert read.tolist() == epoch.tolist()
    assert order.rank_blocks(3, lanes, 256 // lanes, 4).tolist() == order.blocks(256 + 3 * 32, 4).tolist()  # next epoch
    # fewer blocks than lanes: each lane reads one block an epoch
    tiny = BlockOrder(3, seed=2, shard_blocks=1)
    for lane in range(4):
        assert tiny.rank_blocks(lane, 4, 0, 2).tolist() == [tiny.blocks(lane % 3, 1)[0], tiny.blocks(3 + lane % 3, 1)[0]]
    assert epochs_for(100, 8, 400) == 2.0


def test_ranks_read_disjoint_blocks_within_a_step():
    order = BlockOrder(1000, 0)
    seen = []
    for rank in range(4):
        for mb in step_micro_batches(order, step=7, global_batch=32, micro=2, rank=rank, world=4):
            assert len(mb) == 2
            seen += mb.tolist()
    assert len(seen) == 32 and len(set(seen)) == 32
    assert sorted(seen) == sorted(order.blocks(7 * 32, 32).tolist())


def test_warmup_then_cosine():
    f = lr_lambda(ScheduleSpec(warmup_steps=4, min_lr_ratio=0.1), total_steps=20)
    values = [f(s) for s in range(21)]
    assert values[0] < values[3] < values[4] == pytest.approx(1.0)
    assert values[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[4:], values[5:], strict=False))


def test_state_transitions_are_enforced_and_persisted(tmp_path):
    rec = RunRecord(run_id="r1", pipeline="p", run_uri=str(tmp_path), spec_hash="h")
    rec.set_run_state(RunState.RUNNING)
    rec.set_job("pretrain", JobState.QUEUED)
    rec.set_job("pretrain", JobState.RUNNING)
    with pytest.raises(IllegalTransitionError):
        rec.set_job("pretrain", JobState.SKIPPED)
    rec.set_job("pretrain", JobState.FAILED, error="boom")
    rec.set_job("pretrain", JobState.QUEUED)  # a retry
    rec.set_job("pretrain", JobState.RUNNING)
    rec.set_job("pretrain", JobState.SUCCEEDED, outputs={"model_uri": "x"})
    rec.set_run_state(RunState.SUCCEEDED)
    with pytest.raises(IllegalTransitionError):
        rec.set_run_state(RunState.RUNNING)
    loaded = RunRecord.load(str(tmp_path))
    assert loaded.state is RunState.SUCCEEDED
    assert loaded.job("pretrain").attempts == 2
    assert loaded.job("pretrain").outputs == {"model_uri": "x"}
    for state in RunState:
        assert state.is_terminal() == (state in (RunState.SUCCEEDED, RunState.FAILED, RunState.STOPPED))


def _published(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "weights.bin").write_bytes(os.urandom(4096))
    (src / "config.json").write_text("{}")
    dst = str(tmp_path / "ckpt")
    checkpoint.publish_dir(str(src), dst)
    return dst


def test_checkpoint_publish_and_verify(tmp_path):
    dst = _published(tmp_path)
    assert checkpoint.fetch_verified(dst) == dst
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]


@pytest.mark.parametrize("damage,expect", [
    ("truncate", "weights.bin: size"),
    ("flip", "weights.bin: SHA-256 mismatch"),
    ("delete_manifest", "MANIFEST.json missing"),
    ("delete_file", "config.json: missing"),
])
def test_checkpoint_damage_is_detected(tmp_path, damage, expect):
    dst = _published(tmp_path)
    weights = os.path.join(dst, "weights.bin")
    if damage == "truncate":
        with open(weights, "r+b") as f:
            f.truncate(100)
    elif damage == "flip":
        with open(weights, "r+b") as f:
            f.seek(10)
            byte = f.read(1)
            f.seek(10)
            f.write(bytes([byte[0] ^ 0xFF]))
    elif damage == "delete_manifest":
        os.remove(os.path.join(dst, checkpoint.MANIFEST))
    else:
        os.remove(os.path.join(dst, "config.json"))
    with pytest.raises(checkpoint.CorruptCheckpointError) as info:
        checkpoint.fetch_verified(dst)
    assert expect in str(info.value) and dst in str(info.value)


def test_corpus_builder_chunks_dedupes_and_keeps_corpora_disjoint(tmp_path):
    import corpus

    para = "word " * 60
    sources = {
        "general": lambda: iter([f"{para}\n\n{para}A", "shared " * 50]),
        "legal": lambda: iter(["shared " * 50, "licence " * 60]),
        "code": lambda: iter(["def f():\n    return 1\n" * 20]),
        "docs": lambda: iter(["# Title\n\n" + "doc " * 80]),
    }
    stats = corpus.build(str(tmp_path), {k: 10_000 for k in sources}, sources)
    docs = {n: [json.loads(x)["text"] for x in (tmp_path / f"{n}.jsonl").read_text().splitlines()] for n in sources}
    assert "shared " * 49 + "shared" in docs["general"][-1] or any("shared" in d for d in docs["general"])
    assert not any("shared" in d for d in docs["legal"])  # kept only in the first corpus
    assert stats["legal"]["documents"] == 1
    all_docs = [d for v in docs.values() for d in v]
    assert len(all_docs) == len(set(all_docs))
    assert all(len(d) >= 200 for d in all_docs)


def test_real_corpora_are_disjoint(corpus_dir):
    texts = {}
    for name in ("general", "legal", "code", "docs"):
        lines = (corpus_dir / f"{name}.jsonl").read_text().splitlines()
        texts[name] = {json.loads(x)["text"] for x in lines}
        assert len(texts[name]) >= 10, name
    names = list(texts)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not texts[a] & texts[b], (a, b)
    assert np.mean([len(t) for t in texts["code"]]) > 200
