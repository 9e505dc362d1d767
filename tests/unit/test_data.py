"""Tokenizer training, the held-out split, packing and the packed-data cache."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from branchout.core.spec import DatasetSpec
from branchout.stages.job import DataJob
from branchout.stages.prepare import data
from branchout.stages.prepare.tokenizer import EOS, load_tokenizer, tokenizer_hash, train_tokenizer
from branchout.storage.checkpoint import publish_dir


@pytest.fixture(scope="module")
def tokenizer_dir(corpus_dir, tmp_path_factory):
    texts = [json.loads(line)["text"] for line in (corpus_dir / "general.jsonl").read_text().splitlines()]
    work, out = tmp_path_factory.mktemp("tok-work"), tmp_path_factory.mktemp("tok") / "published"
    train_tokenizer(texts, vocab_size=400, min_frequency=2, out_dir=str(work))
    publish_dir(str(work), str(out))  # what the tokenizer stage does: readers verify the manifest
    return str(out)


def test_tokenizer_roundtrips_any_text(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    assert len(tok) == 400 and tok.eos_token == EOS and tok.pad_token_id is not None
    text = "def f(x):\n    return x  # § ünïcode ✓ 漢字"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: nothing is unknown


def test_tokenizer_hash_is_content_based(tokenizer_dir, tmp_path):
    h1 = tokenizer_hash(tokenizer_dir)
    load_tokenizer(tokenizer_dir).save_pretrained(tmp_path)
    assert tokenizer_hash(str(tmp_path)) == h1


def test_heldout_split_is_fixed_and_disjoint():
    docs = [f"document number {i} " * 5 for i in range(2000)]
    held = [d for d in docs if data.is_heldout(d, 0, 0.1)]
    assert 150 < len(held) < 250
    assert held == [d for d in docs if data.is_heldout(d, 0, 0.1)]  # deterministic
    assert held != [d for d in docs if data.is_heldout(d, 1, 0.1)]  # seeded


def test_blocks_carry_across_documents_fill_shards_and_drop_the_tail(tmp_path):
    from branchout.stages.prepare.blocks import BlockWriter

    writer = BlockWriter(str(tmp_path), "train", 4, np.uint16, shard_blocks=1)
    for doc in ([1, 2, 3], [4, 5, 6, 7, 8], [9, 10]):
        writer.write(np.array(doc))
    assert writer.close() == ["00000-train.bin", "00001-train.bin"]  # 9, 10 is shorter than a block
    rows = [np.fromfile(tmp_path / name, dtype=np.uint16).tolist() for name in writer.shards]
    assert rows == [[1, 2, 3, 4], [5, 6, 7, 8]]


def test_prepare_packs_both_sides_and_reuses_cache(corpus_dir, tokenizer_dir, tmp_path):
    ds = DatasetSpec(path=str(corpus_dir / "legal.jsonl"))
    h = tokenizer_hash(tokenizer_dir)
    info = data.prepare(DataJob(dataset=ds, tokenizer_uri=tokenizer_dir, tokenizer_hash=h, seq_len=32,
                                heldout_fraction=0.2, split_seed=0, cache_root=str(tmp_path / "cache")))
    assert not info.cached and info.train_blocks > 10 and info.heldout_blocks > 0
    train = data.open_blocks(info.uri, "train")
    held = data.open_blocks(info.uri, "heldout")
    assert train.shape == (info.train_blocks, 32) and held.shape == (info.heldout_blocks, 32)
    eos = load_tokenizer(tokenizer_dir).eos_token_id
    assert (np.asarray(train) == eos).sum() > 0  # documents are separated by EOS
    again = data.prepare(DataJob(dataset=ds, tokenizer_uri=tokenizer_dir, tokenizer_hash=h, seq_len=32,
                                 heldout_fraction=0.2, split_seed=0, cache_root=str(tmp_path / "cache")))
    assert again.cached and again.uri == info.uri
    other = data.prepare(DataJob(dataset=ds, tokenizer_uri=tokenizer_dir, tokenizer_hash=h, seq_len=16,
                                 heldout_fraction=0.2, split_seed=0, cache_root=str(tmp_path / "cache")))
    assert other.uri != info.uri  # the block length is part of the key


def test_prepare_sends_each_shard_to_storage_as_it_fills(corpus_dir, tokenizer_dir, tmp_path, monkeypatch):
    """Local scratch holds a few finished shards at a time, never the packed set, so a corpus
    larger than a node's disk still packs; the published copy is complete and verifies."""
    from branchout.storage import checkpoint

    on_disk = []
    add = checkpoint.Publisher.add

    def counting_add(self, path, name=None):
        on_disk.append(sum(n.endswith(".bin") for n in os.listdir(os.path.dirname(path))))
        add(self, path, name)

    monkeypatch.setattr(checkpoint.Publisher, "add", counting_add)
    ds = DatasetSpec(path=str(corpus_dir / "legal.jsonl"))
    info = data.prepare(DataJob(dataset=ds, tokenizer_uri=tokenizer_dir,
                                tokenizer_hash=tokenizer_hash(tokenizer_dir), seq_len=32, heldout_fraction=0.2,
                                split_seed=0, cache_root=str(tmp_path / "cache")), shard_blocks=1)
    assert len(on_disk) == info.train_blocks + info.heldout_blocks + 2 > 12  # one add per shard, shingles, meta
    # at each add: up to 2 still in flight, the one just finished, the other side's open shard
    assert max(on_disk) <= 4
    assert checkpoint.full_problems(info.uri) == []
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [info.uri.rsplit("/", 1)[-1]]


def test_prepare_rejects_data_smaller_than_a_block(tokenizer_dir, tmp_path):
    small = tmp_path / "small.jsonl"
    small.write_text(json.dumps({"text": "too short"}) + "\n")
    with pytest.raises(data.DataError, match="small.jsonl: too little text for one 32-token training block"):
        data.prepare(DataJob(dataset=DatasetSpec(path=str(small)), tokenizer_uri=tokenizer_dir,
                             tokenizer_hash="h", seq_len=32, heldout_fraction=0.1, split_seed=0,
                             cache_root=str(tmp_path / "c")))


def test_resolve_source(tmp_path):
    (tmp_path / "a.jsonl").write_text("{}")
    (tmp_path / "b.parquet").write_text("")
    with pytest.raises(data.DataError, match="mixes file types"):
        data.resolve_source(DatasetSpec(path=str(tmp_path)))
    with pytest.raises(data.DataError, match="no such file or directory"):
        data.resolve_source(DatasetSpec(path=str(tmp_path / "missing.txt")))
    assert data.resolve_source(DatasetSpec(path=str(tmp_path / "*.jsonl"))).builder == "json"
    assert data.resolve_source(DatasetSpec(path="wikitext")).is_hub


def test_text_column_and_formats(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a b c", "d e f"]}), tmp_path / "x.parquet")
    docs = data.load_documents(DatasetSpec(path=str(tmp_path / "x.parquet"), text_column="body"))
    assert docs["text"] == ["a b c", "d e f"]
    with pytest.raises(data.DataError, match="no column 'text' \\(columns: body\\)"):
        data.load_documents(DatasetSpec(path=str(tmp_path / "x.parquet")))
    (tmp_path / "t.txt").write_text("para one\nstill one\n\npara two\n")
    assert len(data.load_documents(DatasetSpec(path=str(tmp_path / "t.txt")))) == 2
