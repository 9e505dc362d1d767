"""The decontaminated held-out split: near-duplicates never straddle it, a domain's held-out
documents that the pretraining corpus holds are not scored, and documents only ever move
held-out → training."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from branchout.core.spec import DatasetSpec
from branchout.stages.job import DataJob
from branchout.stages.prepare import data
from branchout.stages.prepare.split import SAMPLE_BITS, is_heldout, shingles
from branchout.stages.prepare.tokenizer import load_tokenizer, tokenizer_hash

FRACTION, SEQ = 0.25, 16
MARKER = re.compile(r"doc-(\d{4})")


def _prose(corpus_dir, *names: str) -> list[str]:
    """Real documents of 120+ words from quickstart corpora."""
    docs = [json.loads(line)["text"] for name in names
            for line in (corpus_dir / f"{name}.jsonl").read_text().splitlines()]
    return [d for d in docs if len(d.split()) >= 120]


def _word_jaccard(a: str, b: str) -> float:
    def grams(t):
        w = t.split()
        return {tuple(w[i:i + 8]) for i in range(len(w) - 7)}
    ga, gb = grams(a), grams(b)
    return len(ga & gb) / len(ga | gb)


def _markers(info, side: str, tok) -> set[int]:
    ids = np.asarray(data.open_blocks(info.uri, side)).reshape(-1)
    return {int(m) for m in MARKER.findall(tok.decode(ids.tolist()))}


@pytest.fixture(scope="module")
def families(corpus_dir, tmp_path_factory):
    """30 families of 4 near-duplicates (a licence-like header line differs) and 40 singletons."""
    prose = _prose(corpus_dir, "general", "docs")
    docs, family_of = [], {}
    for f in range(30):
        for v in range(4):
            family_of[len(docs)] = f
            docs.append(f"Copyright (c) {2001 + v} holder {v} doc-{len(docs):04d}\n\n{prose[f]}")
    for s in range(40):
        docs.append(f"Note doc-{len(docs):04d}\n\n{prose[30 + s]}")
    path = tmp_path_factory.mktemp("families") / "families.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    assert min(_word_jaccard(docs[0], docs[v]) for v in (1, 2, 3)) >= 0.8  # near-duplicates by any measure
    return path, docs, family_of


def _straddling(info, tok, family_of) -> set[int]:
    held, train = _markers(info, "heldout", tok), _markers(info, "train", tok)
    return {family_of[d] for d in held if d in family_of} & {family_of[d] for d in train if d in family_of}


def test_near_duplicates_never_straddle_the_split(families, tokenizer_dir, tmp_path):
    path, docs, family_of = families
    tok, h = load_tokenizer(tokenizer_dir), tokenizer_hash(tokenizer_dir)
    plain = data.prepare(DataJob(dataset=DatasetSpec(path=str(path)), tokenizer_uri=tokenizer_dir,
                                 tokenizer_hash=h, seq_len=SEQ, heldout_fraction=FRACTION, split_seed=0,
                                 cache_root=str(tmp_path)), decontaminate=False)
    assert _straddling(plain, tok, family_of), "the check must fail without decontamination"
    clean = data.prepare(DataJob(dataset=DatasetSpec(path=str(path)), tokenizer_uri=tokenizer_dir,
                                 tokenizer_hash=h, seq_len=SEQ, heldout_fraction=FRACTION, split_seed=0,
                                 cache_root=str(tmp_path)))
    assert not _straddling(clean, tok, family_of)
    assert clean.heldout_moved_near_duplicates > 0 and clean.heldout_blocks > 0
    # only held-out → training: every document the hash put in training (the tokenizer's) stays there
    hashed_train = {i for i, d in enumerate(docs) if not is_heldout(d, 0, FRACTION)}
    assert hashed_train <= _markers(clean, "train", tok)
    assert clean.train_docs + clean.heldout_docs == plain.train_docs + plain.heldout_docs == len(docs)


def test_domain_heldout_text_the_pretraining_corpus_holds_is_not_scored(corpus_dir, tokenizer_dir, tmp_path):
    h = tokenizer_hash(tokenizer_dir)
    tok = load_tokenizer(tokenizer_dir)
    general = corpus_dir / "general.jsonl"
    pretrain = data.prepare(DataJob(dataset=DatasetSpec(path=str(general)), tokenizer_uri=tokenizer_dir,
                                    tokenizer_hash=h, seq_len=SEQ, heldout_fraction=FRACTION, split_seed=0,
                                    cache_root=str(tmp_path)))
    pretraining_text = [t for t in (json.loads(x)["text"] for x in general.read_text().splitlines())
                        if not is_heldout(t, 0, FRACTION)]
    own = [json.loads(x)["text"] for x in (corpus_dir / "code.jsonl").read_text().splitlines()]
    copied = [f"# doc-{i:04d}\n{t}" for i, t in enumerate(pretraining_text[:40])]
    domain = tmp_path / "domain.jsonl"
    domain.write_text("".join(json.dumps({"text": t}) + "\n" for t in own + copied))
    alone = data.prepare(DataJob(dataset=DatasetSpec(path=str(domain)), tokenizer_uri=tokenizer_dir,
                                 tokenizer_hash=h, seq_len=SEQ, heldout_fraction=FRACTION, split_seed=0,
                                 cache_root=str(tmp_path)))
    assert _markers(alone, "heldout", tok), "copies of pretraining text are scored without the reference"
    checked = data.prepare(DataJob(dataset=DatasetSpec(path=str(domain)), tokenizer_uri=tokenizer_dir,
                                   tokenizer_hash=h, seq_len=SEQ, heldout_fraction=FRACTION, split_seed=0,
                                   cache_root=str(tmp_path), reference_uris=(pretrain.uri,)))
    assert not _markers(checked, "heldout", tok)
    assert checked.heldout_dropped_pretraining_overlap >= len(_markers(alone, "heldout", tok))
    assert checked.uri != alone.uri  # the reference is part of the cache key


def test_shingles_hash_text_not_position_and_skip_document_ends():
    rng = np.random.default_rng(0)
    doc = rng.integers(0, 400, 600)
    eos = np.array([399])
    alone, counts = shingles(np.concatenate([doc, eos]), np.array([601]))
    other = rng.integers(0, 400, 50)
    both, counts2 = shingles(np.concatenate([other, eos, doc, eos]), np.array([51, 601]))
    assert counts2[1] == counts[0] and (both[counts2[0]:] == alone).all()  # same text, same shingles
    assert abs(counts[0] / (600 - 7) - 1 / 2**SAMPLE_BITS) < 0.06  # ~1 in 8 sampled


def test_shingle_hashes_are_the_documented_polynomial_across_hashing_chunks():
    """The doubling, chunked hash equals the plain sum over each n-gram (packed caches
    and published shingle sets depend on these exact values), across a chunk boundary."""
    from branchout.stages.prepare.split import _HASH_CHUNK

    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 65536, _HASH_CHUNK + 300).astype(np.uint16)
    lengths = np.array([1000, _HASH_CHUNK - 1500, len(tokens) - _HASH_CHUNK + 500])
    want, _ = _reference(tokens, lengths)  # n-grams over an EOS or two documents are not text
    got, counts = shingles(tokens, lengths)
    assert got.tolist() == want and counts.sum() == len(want) and (counts > 0).all()


def _reference(tokens: np.ndarray, lengths: np.ndarray) -> tuple[list[int], list[int]]:
    """The documented shingles, computed plainly: every n-gram inside one document's text
    (never over its EOS), hashed as the polynomial and mixed, 1 in 8 kept by the top bits."""
    from branchout.stages.prepare.split import _MIX, _P, NGRAM

    hashes, counts = [], []
    start = 0
    for length in lengths.tolist():
        kept = 0
        for j in range(start, start + length - 1 - NGRAM + 1):  # the EOS is the document's last token
            h = sum((int(tokens[j + k]) + 1) * pow(_P, k, 1 << 64) for k in range(NGRAM)) % (1 << 64)
            h ^= h >> 31
            h = h * int(_MIX) % (1 << 64)
            h ^= h >> 29
            if h >> (64 - SAMPLE_BITS) == 0:
                hashes.append(h)
                kept += 1
        counts.append(kept)
        start += length
    return hashes, counts


def _docs(rng, lengths: list[int]) -> tuple[np.ndarray, np.ndarray]:
    parts = [np.append(rng.integers(0, 5000, n - 1), 4999) for n in lengths]  # text, then its EOS
    return np.concatenate(parts).astype(np.uint16), np.array(lengths)


def test_shingles_of_many_short_documents_are_the_reference_ones():
    """Documents shorter than an n-gram, just long enough for one, and longer: edges decide."""
    rng = np.random.default_rng(7)
    tokens, lengths = _docs(rng, rng.integers(1, 40, 300).tolist())
    got, counts = shingles(tokens, lengths)
    want, want_counts = _reference(tokens, lengths)
    assert got.tolist() == want and counts.tolist() == want_counts
    assert sum(c > 0 for c in want_counts) > 50  # the check had material


def test_the_first_and_the_only_n_gram_count():
    from branchout.stages.prepare.split import NGRAM

    def sampled_at_start(n: int):
        for seed in range(1000):  # a text whose first n-gram is sampled (1 in 8)
            tokens, lengths = _docs(np.random.default_rng(seed), [n])
            if _reference(tokens[:NGRAM + 1], np.array([NGRAM + 1]))[0]:
                return tokens, lengths
        raise AssertionError("no seed")

    tokens, lengths = sampled_at_start(NGRAM + 1)  # exactly one n-gram of text
    got, counts = shingles(tokens, lengths)
    assert len(got) == 1 and counts.tolist() == [1] and got.tolist() == _reference(tokens, lengths)[0]
    tokens, lengths = sampled_at_start(200)
    got, _ = shingles(tokens, lengths)
    assert got.tolist() == _reference(tokens, lengths)[0] and got[0] == _reference(tokens[:NGRAM + 1],
                                                                                  np.array([NGRAM + 1]))[0][0]
    for n in (1, NGRAM - 1, NGRAM):  # no n-gram of text at all
        got, counts = shingles(*_docs(np.random.default_rng(n), [n]))
        assert len(got) == 0 and counts.tolist() == [0]


def test_sorted_unique_contains_and_partitions():
    from branchout.stages.prepare.split import (
        PARTITION_BITS,
        _partition,
        _sorted_unique,
        contains_sorted,
    )

    rng = np.random.default_rng(3)
    values = rng.integers(0, 50, 200).astype(np.uint64)
    assert _sorted_unique(values).tolist() == np.unique(values).tolist()
    assert _sorted_unique(np.array([9], np.uint64)).tolist() == [9] and len(_sorted_unique(values[:0])) == 0
    hay = np.array([3, 5, 9], np.uint64)
    needles = np.array([1, 3, 4, 9, 12], np.uint64)
    assert contains_sorted(hay, needles).tolist() == [False, True, False, True, False]
    assert contains_sorted(np.array([5], np.uint64), np.array([5], np.uint64)).tolist() == [True]
    assert contains_sorted(hay[:0], needles).tolist() == [False] * 5
    assert contains_sorted(hay, needles[:0]).tolist() == []
    shift = 64 - SAMPLE_BITS - PARTITION_BITS  # sampled hashes have their top bits 0: the next 8 choose
    top = (1 << PARTITION_BITS) - 1
    assert _partition(np.array([0, 1 << shift, top << shift | 12345], np.uint64)).tolist() == [0, 1, top]


def test_a_text_is_held_out_at_the_fraction_asked():
    held = sum(is_heldout(f"document {i}", seed=11, fraction=0.2) for i in range(4000))
    assert 0.17 < held / 4000 < 0.23


def _hashes(rng, n: int, partitions=range(256)) -> np.ndarray:
    """Sampled-looking shingle hashes (top bits 0) spread over ``partitions``."""
    from branchout.stages.prepare.split import PARTITION_BITS

    shift = 64 - SAMPLE_BITS - PARTITION_BITS
    parts = rng.choice(np.array(list(partitions), np.uint64), n)
    return (parts << np.uint64(shift)) | rng.integers(0, 1 << shift, n, dtype=np.uint64)


def test_the_decontaminator_moves_exactly_the_contained_documents(tmp_path):
    """Held-out documents by containment in the training shingles, at any partition: fully
    contained and at the threshold move, a chain follows a moved document, below it or
    empty stay, the pretraining corpus's text is dropped; the set written is training plus
    moved, nothing of what stayed."""
    from branchout.stages.prepare.split import Decontaminator

    rng = np.random.default_rng(5)
    train = _hashes(rng, 6000, [p for p in range(256) if p != 7])  # partition 7 has no training text
    fresh = _hashes(rng, 400)
    reference = np.sort(_hashes(rng, 100))
    in_7 = _hashes(rng, 20, [7])
    docs = {
        "contained": train[:100],
        "at threshold": np.concatenate([train[100:150], fresh[:50]]),      # 50% = THRESHOLD: moves
        "below": np.concatenate([train[150:199], fresh[50:101]]),        # 49%: stays
        "chain": np.concatenate([train[200:220], fresh[:40]]),           # 33%, then all once "at threshold" moved
        "one shingle": train[300:301],
        "empty": train[:0],
        "fresh in partition 7": in_7,
        "pretraining's": reference[:80],
    }
    d = Decontaminator(str(tmp_path / "work"))
    for chunk in np.array_split(train, 7):
        d.add_train(chunk)
    for values in docs.values():
        d.add_heldout(values, np.array([len(values)]))
    decisions = d.finish(str(tmp_path / "set.u64"), [reference])
    fate = dict(zip(docs, decisions.fate.tolist(), strict=True))
    assert fate == {"contained": 1, "at threshold": 1, "below": 0, "chain": 1, "one shingle": 1, "empty": 0,
                    "fresh in partition 7": 0, "pretraining's": 2}, fate
    assert (decisions.moved, decisions.dropped) == (4, 1)
    written = np.fromfile(tmp_path / "set.u64", np.uint64)
    moved = np.concatenate([docs[k] for k, f in fate.items() if f])
    assert written.tolist() == np.unique(np.concatenate([train, moved])).tolist()


def test_a_decontaminator_with_no_held_out_text_writes_the_training_set(tmp_path):
    from branchout.stages.prepare.split import Decontaminator

    train = _hashes(np.random.default_rng(2), 500)
    d = Decontaminator(str(tmp_path / "work"))
    assert len(d._train_partition(3)) == 0  # a partition no training text reached is empty
    d.add_train(train)
    decisions = d.finish(str(tmp_path / "set.u64"))
    assert len(decisions.fate) == 0
    assert np.fromfile(tmp_path / "set.u64", np.uint64).tolist() == np.unique(train).tolist()
