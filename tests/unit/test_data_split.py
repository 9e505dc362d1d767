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
    from branchout.stages.prepare.split import _HASH_CHUNK, _MIX, _P, NGRAM

    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 65536, _HASH_CHUNK + 300).astype(np.uint16)
    lengths = np.array([1000, _HASH_CHUNK - 1500, len(tokens) - _HASH_CHUNK + 500])
    ends = set(np.cumsum(lengths) - 1)
    want = []
    for j in range(len(tokens) - NGRAM + 1):
        if any(j + k in ends for k in range(NGRAM)):
            continue  # n-grams over an EOS or two documents are not text
        h = sum((int(tokens[j + k]) + 1) * pow(_P, k, 1 << 64) for k in range(NGRAM)) % (1 << 64)
        h ^= h >> 31
        h = h * int(_MIX) % (1 << 64)
        h ^= h >> 29
        if h >> (64 - SAMPLE_BITS) == 0:
            want.append(h)
    got, counts = shingles(tokens, lengths)
    assert got.tolist() == want and counts.sum() == len(want) and (counts > 0).all()
