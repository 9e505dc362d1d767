"""Tokenizer stage: train a byte-level BPE on a sample of the pretraining corpus, or load one.

Byte-level BPE never produces an unknown token, so any text the fine-tune domains
bring (code, legal, other scripts) is representable by the tokenizer the base model was
trained with. The result is saved as a ``PreTrainedTokenizerFast`` directory so the
exported models load with ``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from branchout.stages.job import TokenizerJob

EOS = "<|endoftext|>"
PAD = "<|pad|>"


class TokenizerError(ValueError):
    """A tokenizer directory is missing or unreadable."""


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int, out_dir: str) -> str:
    """Train a byte-level BPE on ``texts`` and save it under ``out_dir``.

    Returns:
        The SHA-256 of the saved ``tokenizer.json``: the tokenizer's identity in data
        cache keys.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_non_empty(texts), trainer=trainer)
    save_fast_tokenizer(tok, out_dir)
    return tokenizer_hash(out_dir)


def save_fast_tokenizer(tok, out_dir: str) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD, unk_token=None
    )
    fast.model_max_length = 1 << 30
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)


def load_tokenizer(path: str):
    """Load a saved tokenizer directory.

    Raises:
        TokenizerError: the directory does not exist or holds no usable tokenizer.
    """
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise TokenizerError(f"{path}: no such tokenizer directory")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: cannot load tokenizer ({str(e).splitlines()[0]})") from None
    if tok.eos_token_id is None:
        raise TokenizerError(f"{path}: tokenizer defines no eos token, needed between documents")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def rust_tokenizer(path: str) -> tuple[str, int, int]:
    """(the Rust tokenizer's JSON, EOS id, vocabulary size) of a saved tokenizer directory.

    What the data stage's workers need. Read straight from ``tokenizer.json`` and
    ``tokenizer_config.json`` when they name an EOS token, which spares the data stage
    importing transformers (seconds per process); anything else goes through
    ``load_tokenizer``.

    Raises:
        TokenizerError: as ``load_tokenizer``, or a tokenizer without a Rust backend.
    """
    import json

    config = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(os.path.join(path, "tokenizer.json")) and os.path.isfile(config):
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        with open(config) as f:
            eos = json.load(f).get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        eos_id = tok.token_to_id(eos) if isinstance(eos, str) else None
        if eos_id is not None:
            return tok.to_str(), eos_id, tok.get_vocab_size(with_added_tokens=True)
    tok = load_tokenizer(path)
    if not tok.is_fast:
        raise TokenizerError(f"{path}: the data stage needs a fast (Rust) tokenizer")
    return tok.backend_tokenizer.to_str(), tok.eos_token_id, len(tok)


def special_token_ids(tok) -> dict[str, int]:
    """Ids the model config must agree with."""
    return {
        "bos_token_id": tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }


def tokenizer_hash(path: str) -> str:
    """Content hash of what decides token ids: ``tokenizer.json`` (vocabulary, merges,
    special tokens) when present, else every vocabulary file. Loader bookkeeping that
    ``save_pretrained`` adds to ``tokenizer_config.json`` must not change the identity."""
    h = hashlib.sha256()
    root = Path(path)
    files = [root / "tokenizer.json"] if (root / "tokenizer.json").is_file() else sorted(
        f for f in root.iterdir() if f.is_file() and f.name not in ("MANIFEST.json", "tokenizer_config.json"))
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _non_empty(texts: Iterable[str]) -> Iterator[str]:
    for t in texts:
        if t and t.strip():
            yield t


def sample_texts(ds, sample_bytes: int, heldout_fraction: float, split_seed: int) -> Iterator[str]:
    """About ``sample_bytes`` of the corpus's training documents: a seeded sample, read in
    one pass of bounded memory.

    Large corpora are sampled twice: a seeded choice of read units holding about twice the
    sample (so it spreads over the corpus, not just its start), then each training document
    of those units with probability ``sample_bytes / their bytes``, decided by a hash of
    its text. Hub datasets (size unknown) give their first ``sample_bytes``.
    """
    import numpy as np

    from branchout.stages.prepare.documents import plan_units, unit_texts
    from branchout.stages.prepare.split import is_heldout

    units = plan_units(ds)
    total = sum(u.size for u in units)
    if total > 2 * sample_bytes:
        order = np.random.default_rng([split_seed, 7]).permutation(len(units))
        room = np.cumsum([units[i].size for i in order])
        units = [units[i] for i in sorted(order[: int(np.searchsorted(room, 2 * sample_bytes)) + 1])]
        total = sum(u.size for u in units)
    rate = min(1.0, sample_bytes / total) if total else 1.0
    taken = 0
    for unit in units:
        for texts in unit_texts(unit, ds.text_column):
            for text in texts:
                if is_heldout(text, split_seed, heldout_fraction) or not _sampled(text, split_seed, rate):
                    continue
                yield text
                taken += len(text.encode())
                if taken >= sample_bytes:
                    return


def _sampled(text: str, seed: int, rate: float) -> bool:
    digest = hashlib.blake2b(f"tokenizer-sample\0{seed}\0{text}".encode(), digest_size=8).digest()
    return rate >= 1.0 or int.from_bytes(digest, "big") / 2**64 < rate


def tokenizer_job(job: TokenizerJob) -> str:
    """The tokenizer stage as one task: train on a seeded sample (``tokenizer.sample_bytes``)
    of the pretraining corpus's *training* documents (held-out text must not shape the
    vocabulary it is scored with), or copy an existing tokenizer in, so the run directory
    is self-contained. Returns the hash."""
    import tempfile

    from branchout.storage.checkpoint import publish_dir

    options = job.tokenizer
    with tempfile.TemporaryDirectory(prefix="branchout-tok-") as tmp:
        if options.path:
            load_tokenizer(options.path).save_pretrained(tmp)
        else:
            # A mixture's sources each give an equal share of the sample, whatever their
            # weights: a new weight then keeps the tokenizer, and so every packed source.
            share = max(1, options.sample_bytes // len(job.corpora))
            texts = itertools.chain.from_iterable(
                sample_texts(ds, share, job.heldout_fraction, job.split_seed) for ds, _ in job.corpora)
            train_tokenizer(texts, options.vocab_size, options.min_frequency, tmp)
        publish_dir(tmp, job.out_uri)
        return tokenizer_hash(tmp)
