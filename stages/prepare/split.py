"""The held-out split, decontaminated: near-duplicates never straddle it.

Step 1, per document (``is_heldout``): a seeded hash of the exact text puts a document on
the held-out side with probability ``fraction``. Fixed across runs, independent of file
order, identical documents on one side. The tokenizer trains on this side's complement.

Step 2, after every document was seen (``Decontaminator``): a held-out document whose
text is mostly training text is taken out of the held-out side and trained on instead.
"Mostly" is *containment*: the share of the document's shingles (hashed ``NGRAM``-token
n-grams) that occur anywhere in the training text is at least ``THRESHOLD``. Containment
of A in the training text is at least the Jaccard similarity of A with any single training
document, so every held-out document with a Jaccard ≥ ``THRESHOLD`` near-duplicate in
training is moved; containment also catches boilerplate assembled from several training
documents (licence texts that differ in a copyright line), which pairwise Jaccard misses.
Moved documents become training text, so the check repeats until nothing moves: chains of
near-duplicates end up on one side. A domain's held-out documents whose text is mostly in
the pretraining corpus's training text (its published shingle set, ``reference``) are
taken out the same way: the base model was trained on them, so scoring them would flatter
it. Documents only ever move held-out → training, never back, so the tokenizer's training
documents (step 1's training side) stay training documents.

Memory: shingles are sampled by hash (``SAMPLE_BITS``: 1 in 8), the same shingles in every
document, so containment is estimated on ~1/8 of them. The training side's sampled shingles
are spilled to disk in ``2**PARTITION_BITS`` hash partitions and processed one partition at
a time; only the held-out side's sampled shingles (``fraction`` × tokens / 8 × 8 bytes, ~3%
of a held-out token count's worth of memory) are held in memory.

Glossary: *shingle* an n-gram of token ids, hashed to 64 bits; *moved* held-out → training
(near-duplicate of training text); *dropped* held-out → training because the pretraining
corpus holds it.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

NGRAM = 8  # tokens per shingle
SAMPLE_BITS = 3  # keep shingles whose top 3 bits are 0 (1 in 8)
PARTITION_BITS = 8
THRESHOLD = 0.5
_P = 0x9E3779B97F4A7C15
_MIX = np.uint64(0xBF58476D1CE4E5B9)
_SHIFT = np.uint64(64 - SAMPLE_BITS - PARTITION_BITS)


def is_heldout(text: str, seed: int, fraction: float) -> bool:
    digest = hashlib.blake2b(f"{seed}\0{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def shingles(tokens: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sampled shingle hashes of documents laid end to end.

    Args:
        tokens: every document's ids, each followed by its EOS (which no shingle covers).
        lengths: tokens per document, EOS included.

    Returns:
        (hashes of the sampled shingles in document order, sampled shingles per document).
    """
    n_docs = len(lengths)
    if len(tokens) < NGRAM + 1:
        return np.empty(0, np.uint64), np.zeros(n_docs, np.int64)
    h, at = _sampled_hashes(tokens)
    eos_at = np.cumsum(lengths) - 1
    doc = np.searchsorted(eos_at, at)  # the document each sampled n-gram starts in
    keep = at + NGRAM <= eos_at[doc]  # n-grams that reach into the EOS or the next document are not text
    return h[keep], np.bincount(doc[keep], minlength=n_docs).astype(np.int64)


_P1, _P2, _P4 = (np.uint64(pow(_P, k, 1 << 64)) for k in (1, 2, 4))  # three doublings: NGRAM is 8
_HASH_CHUNK = 1 << 15  # n-grams per pass: the arrays stay in cache (a whole unit's ran 5× slower per token)


def _sampled_hashes(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(hash, start) of every sampled n-gram of ``tokens``.

    The hash is the polynomial ``sum((t[j+k] + 1) * P**k for k < 8)`` modulo 2**64, mixed.
    It is built by doubling (2-grams, then 4-grams, then 8-grams: 3 multiply-adds per
    n-gram, not 7), which wrapping arithmetic makes exactly the same sum.
    """
    n = len(tokens) - NGRAM + 1
    hashes, starts = [], []
    for a in range(0, n, _HASH_CHUNK):
        b = min(n, a + _HASH_CHUNK)
        t = tokens[a:b + NGRAM - 1].astype(np.uint64)
        t += np.uint64(1)
        h2 = t[:-1] + t[1:] * _P1
        h4 = h2[:-2] + h2[2:] * _P2
        h = h4[:b - a] + h4[4:4 + b - a] * _P4
        h ^= h >> np.uint64(31)
        h *= _MIX
        h ^= h >> np.uint64(29)
        at = np.flatnonzero(h >> np.uint64(64 - SAMPLE_BITS) == 0)  # sample first: 1/8 left to check
        hashes.append(h[at])
        starts.append(at + a)
    return np.concatenate(hashes), np.concatenate(starts)


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """``np.unique`` of integers, by sort and compare: numpy 2's hash-based unique took ~3×
    as long on 64-bit shingle hashes."""
    values = np.sort(values)
    return values[np.r_[True, values[1:] != values[:-1]]] if len(values) else values


def _partition(values: np.ndarray) -> np.ndarray:
    return (values >> _SHIFT).astype(np.uint16)


def contains_sorted(haystack: np.ndarray, needles: np.ndarray) -> np.ndarray:
    """``needles`` (sorted) found in ``haystack`` (sorted; may be a memmap)."""
    if len(haystack) == 0 or len(needles) == 0:
        return np.zeros(len(needles), bool)
    at = np.minimum(np.searchsorted(haystack, needles), len(haystack) - 1)
    return np.asarray(haystack[at]) == needles


@dataclass
class Decisions:
    """Per held-out document (in order): 0 stays held out, 1 moved, 2 dropped."""

    fate: np.ndarray

    @property
    def moved(self) -> int:
        return int((self.fate == 1).sum())

    @property
    def dropped(self) -> int:
        return int((self.fate == 2).sum())


class Decontaminator:
    """Collects shingles while documents stream past; decides the split at the end."""

    def __init__(self, workdir: str, threshold: float | None = None, enabled: bool = True):
        self.dir = workdir
        self.threshold = THRESHOLD if threshold is None else threshold
        self.enabled = enabled
        self._held: list[np.ndarray] = []
        self._held_counts: list[np.ndarray] = []
        self._pending: list[np.ndarray] = []
        self._pending_n = 0
        os.makedirs(workdir, exist_ok=True)

    def _part_path(self, p: int) -> str:
        return os.path.join(self.dir, f"train-{p:03d}.u64")

    def add_train(self, values: np.ndarray) -> None:
        self._pending.append(values)
        self._pending_n += len(values)
        if self._pending_n >= 1 << 21:  # spill ~16 MB at a time: few, large appends
            self._spill()

    def _spill(self) -> None:
        if not self._pending_n:
            return
        values = np.concatenate(self._pending)
        parts = _partition(values)
        order = np.argsort(parts, kind="stable")
        bounds = np.searchsorted(parts[order], np.arange((1 << PARTITION_BITS) + 1))
        values = values[order]
        for p in np.flatnonzero(np.diff(bounds)):
            with open(self._part_path(int(p)), "ab") as f:
                values[bounds[p]:bounds[p + 1]].tofile(f)
        self._pending, self._pending_n = [], 0

    def add_heldout(self, values: np.ndarray, counts: np.ndarray) -> None:
        self._held.append(values)
        self._held_counts.append(counts)

    def _train_partition(self, p: int) -> np.ndarray:
        """Partition ``p`` of the training shingles, sorted and unique (and stored so)."""
        path = self._part_path(p)
        if not os.path.exists(path):
            return np.empty(0, np.uint64)
        values = _sorted_unique(np.fromfile(path, np.uint64))
        values.tofile(path)
        return values

    def finish(self, shingles_out: str, references: list[np.ndarray] = ()) -> Decisions:
        """Decide every held-out document's fate; write the training side's shingle set
        (sorted, unique: what a domain's reference is) to ``shingles_out``. ``references``:
        the pretraining corpora's sets (a mixture has one per source)."""
        self._spill()
        held = np.concatenate(self._held) if self._held else np.empty(0, np.uint64)
        counts = np.concatenate(self._held_counts) if self._held_counts else np.empty(0, np.int64)
        doc_of = np.repeat(np.arange(len(counts)), counts)
        uniq, inverse = np.unique(held, return_inverse=True)
        edges = np.searchsorted(_partition(uniq), np.arange((1 << PARTITION_BITS) + 1))
        known = np.zeros(len(uniq), bool)

        def check(p: int) -> None:  # each partition writes its own slice of ``known``
            known[edges[p]:edges[p + 1]] = contains_sorted(self._train_partition(p), uniq[edges[p]:edges[p + 1]])

        # numpy sorts without the GIL: the partitions sort on every core of the node, one
        # partition (1/256 of the training shingles) in memory per thread
        with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
            list(pool.map(check, range(1 << PARTITION_BITS)))
        fate = np.zeros(len(counts), np.int8)
        if self.enabled:
            self._settle(known, inverse, doc_of, counts, fate, 1)
            if len(references):
                for reference in references:
                    known |= contains_sorted(reference, uniq)
                self._settle(known, inverse, doc_of, counts, fate, 2)
        self._write_set(shingles_out, uniq[np.unique(inverse[fate[doc_of] > 0])])
        return Decisions(fate)

    def _settle(self, known, inverse, doc_of, counts, fate, mark: int) -> None:
        """Move documents whose containment in ``known`` reaches the threshold, until none do."""
        while True:
            hits = np.bincount(doc_of, weights=known[inverse], minlength=len(counts))
            new = (fate == 0) & (counts > 0) & (hits >= self.threshold * counts)
            if not new.any():
                return
            fate[new] = mark
            known[inverse[new[doc_of]]] = True

    def _write_set(self, path: str, moved: np.ndarray) -> None:
        """The training side's sampled shingles, moved documents' included, sorted and unique."""
        parts = _partition(moved)
        edges = np.searchsorted(parts, np.arange((1 << PARTITION_BITS) + 1))
        with open(path, "wb") as out:
            for p in range(1 << PARTITION_BITS):
                spill = self._part_path(p)  # sorted and unique since finish() read it
                part = np.fromfile(spill, np.uint64) if os.path.exists(spill) else np.empty(0, np.uint64)
                extra = moved[edges[p]:edges[p + 1]]
                (_sorted_unique(np.concatenate([part, extra])) if len(extra) else part).astype(np.uint64).tofile(out)
                if os.path.exists(spill):
                    os.remove(spill)
