"""Tokenizer stage: train a byte-level BPE on the pretraining corpus, or load one.

Byte-level BPE never produces an unknown token, so any text the fine-tune domains
bring (code, legal, other scripts) is representable by the tokenizer the base model was
trained with. The result is saved as a ``PreTrainedTokenizerFast`` directory so the
exported models load with ``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

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


def tokenizer_job(tokenizer: dict, dataset: dict, heldout_fraction: float, split_seed: int,
                  out_uri: str) -> str:
    """The tokenizer stage as one task: train on the pretraining corpus's *training*
    documents (held-out text must not shape the vocabulary it is scored with), or copy an
    existing tokenizer in, so the run directory is self-contained. Returns the hash."""
    import tempfile

    from branchout.orchestrator.spec import DatasetSpec
    from branchout.stages.checkpoint import publish_dir
    from branchout.stages.data import is_heldout, load_documents

    with tempfile.TemporaryDirectory(prefix="branchout-tok-") as tmp:
        if tokenizer.get("path"):
            load_tokenizer(tokenizer["path"]).save_pretrained(tmp)
        else:
            docs = load_documents(DatasetSpec.model_validate(dataset))
            texts = (t for t in docs["text"] if t and not is_heldout(t, split_seed, heldout_fraction))
            train_tokenizer(texts, tokenizer["vocab_size"], tokenizer["min_frequency"], tmp)
        publish_dir(tmp, out_uri)
        return tokenizer_hash(tmp)
