"""Data stage: load documents, split held-out text by a seeded hash, tokenize, pack blocks.

The held-out split is decided per *document* from a hash of (seed, text), so it is
fixed across runs, independent of file order, and identical documents always land on
the same side: held-out text never appears in training. Each side is tokenized with
``datasets.map(batched=True)``, an EOS token appended after every document, and the
token stream cut into ``seq_len`` blocks (the tail shorter than a block is dropped).

Packed blocks are cached under ``<storage>/cache/data/<key>/`` where the key hashes
the data fingerprint, the tokenizer, the block length and the split; a second run (or a
second domain reading the same files) reuses them.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, fields

import numpy as np

from branchout.orchestrator.spec import DatasetSpec
from branchout.stages import checkpoint, storage

# Bump when packing changes so old caches are not reused.
PACKING_VERSION = 1

_EXTENSION_FORMATS = {
    ".txt": "text", ".text": "text", ".md": "text", ".rst": "text",
    ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv",
}


class DataError(ValueError):
    """A dataset cannot be used; the message names the file or dataset."""


@dataclass
class Source:
    """What ``datasets.load_dataset`` is called with."""

    builder: str  # text | json | parquet | csv | <hub name>
    files: list[str]  # empty for hub datasets
    label: str  # how messages name it

    @property
    def is_hub(self) -> bool:
        return not self.files


def resolve_source(ds: DatasetSpec) -> Source:
    """Find the files (or hub name) behind a dataset spec.

    Raises:
        DataError: no such file, an empty directory, or mixed/unknown file types.
    """
    path = ds.path
    if ds.format == "hub":
        return Source(path, [], path)
    if not storage.is_local(path):
        files = _remote_files(path)
    elif any(c in path for c in "*?["):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
    elif os.path.isdir(path):
        files = sorted(
            os.path.join(root, n)
            for root, _, names in os.walk(path)
            for n in names
            if os.path.splitext(n)[1].lower() in _EXTENSION_FORMATS
        )
    elif os.path.isfile(path):
        files = [path]
    elif ds.format == "auto" and "/" not in path and not os.path.splitext(path)[1]:
        return Source(path, [], path)  # a bare name: a hub dataset
    else:
        raise DataError(f"{path}: no such file or directory")
    if not files:
        raise DataError(f"{path}: no data files found (expected .txt, .jsonl, .parquet or .csv)")
    if ds.format != "auto":
        return Source(ds.format, files, path)
    formats = {_EXTENSION_FORMATS.get(os.path.splitext(f)[1].lower()) for f in files}
    if None in formats:
        bad = next(f for f in files if os.path.splitext(f)[1].lower() not in _EXTENSION_FORMATS)
        raise DataError(f"{bad}: unknown file type; set dataset.format (text, json, parquet, csv)")
    if len(formats) > 1:
        raise DataError(f"{path}: mixes file types {sorted(formats)}; use one type per dataset")
    return Source(formats.pop(), files, path)


def _remote_files(uri: str) -> list[str]:
    """The data files at an object-store URI: the object itself, or those under a prefix."""
    import pyarrow.fs as pafs

    try:
        fs, path = storage.filesystem(uri)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return [uri]
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"{uri}: no such object or prefix")
        scheme = uri.split("://", 1)[0]
        found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except OSError as e:
        raise DataError(f"{uri}: cannot list ({' '.join(str(e).split())[:160]})") from None
    return sorted(f"{scheme}://{i.path}" for i in found if i.type == pafs.FileType.File
                  and os.path.splitext(i.path)[1].lower() in _EXTENSION_FORMATS)


def _local_copies(files: list[str]) -> list[str]:
    """Object-store files copied to a local cache (keyed by URI, size and mtime) for ``datasets``."""
    out = []
    for uri in files:
        if storage.is_local(uri):
            out.append(storage.local_path(uri))
            continue
        fs, path = storage.filesystem(uri)
        info = fs.get_file_info(path)
        key = hashlib.sha256(f"{uri}\0{info.size}\0{info.mtime_ns}".encode()).hexdigest()[:20]
        local = storage.local_cache_dir("data", key, os.path.basename(path))
        if not os.path.exists(local):
            os.makedirs(os.path.dirname(local), exist_ok=True)
            storage.write_bytes(local, storage.read_bytes(uri))
        out.append(local)
    return out


def load_documents(ds: DatasetSpec):
    """The dataset as a ``datasets.Dataset`` with a single ``text`` column.

    Raises:
        DataError: unreadable files, or the text column is missing.
    """
    import datasets

    datasets.disable_progress_bars()
    # datasets logs its own version of a load failure; ours (below) names file and line
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    src = resolve_source(ds)
    kwargs = {}
    if src.builder == "text":
        kwargs["sample_by"] = "paragraph"  # a blank line ends a document in plain text
    try:
        if src.is_hub:
            d = datasets.load_dataset(src.builder, split=ds.split, revision=ds.revision)
        else:
            d = datasets.load_dataset(src.builder, data_files=_local_copies(src.files), split="train", **kwargs)
    except Exception as e:  # datasets raises a zoo of types for unreadable input
        raise DataError(diagnose(src) or f"{src.label}: cannot load ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if ds.text_column not in d.column_names:
        raise DataError(
            f"{src.label}: no column {ds.text_column!r} (columns: {', '.join(d.column_names)}); "
            "set dataset.text_column"
        )
    d = d.select_columns([ds.text_column])
    if ds.text_column != "text":
        d = d.rename_column(ds.text_column, "text")
    return d


def diagnose(src: Source) -> str | None:
    """Name the file, line or byte that made ``datasets`` fail, which its own errors do not."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    for path in _local_copies(src.files):
        if os.path.getsize(path) == 0:
            return f"{path}: file is empty"
        try:
            if src.builder == "parquet":
                if pq.read_metadata(path).num_rows == 0:
                    return f"{path}: file is empty (0 rows)"
            elif src.builder == "csv":
                pcsv.read_csv(path)
            else:
                with open(path, "rb") as f:
                    text = f.read().decode("utf-8")  # the exact offset of a bad byte, if any
                for number, line in enumerate(text.splitlines(), 1):
                    if src.builder == "json" and line.strip():
                        try:
                            row = json.loads(line)
                        except json.JSONDecodeError as e:
                            return f"{path}: line {number}, column {e.colno}: not valid JSON ({e.msg})"
                        if not isinstance(row, dict):
                            return f"{path}: line {number} is a JSON {type(row).__name__}, expected an object"
        except UnicodeDecodeError as e:
            return f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})"
        except Exception as e:  # pyarrow's parse errors are the message we want
            kind = {"parquet": "a Parquet file", "csv": "valid CSV"}.get(src.builder, "readable")
            return f"{path}: not {kind} ({' '.join(str(e).split())[:160]})"
    return None


def fingerprint(ds: DatasetSpec) -> str:
    """Identity of the data: file paths, sizes and content hashes; hub name and revision.

    Content hashes are remembered per (path, size, modification time) in
    ``fingerprints.json`` of the local cache (``storage.local_cache_dir``), so only files
    that changed are read again.
    Object-store files count by URI, size and modification time.
    """
    src = resolve_source(ds)
    h = hashlib.sha256(json.dumps([src.builder, ds.text_column, ds.split, ds.revision]).encode())
    known = _load_fingerprint_cache()
    changed = False
    for f in src.files:
        if not storage.is_local(f):
            fs, path = storage.filesystem(f)
            info = fs.get_file_info(path)
            h.update(f"{f}\0{info.size}\0{info.mtime_ns}".encode())
            continue
        stat = os.stat(f)
        ident = f"{os.path.abspath(f)}\0{stat.st_size}\0{stat.st_mtime_ns}"
        if ident not in known:
            known[ident] = _sha256_of(f)
            changed = True
        h.update(os.path.abspath(f).encode())
        h.update(known[ident].encode())
    if changed:
        _save_fingerprint_cache(known)
    return h.hexdigest()


def _load_fingerprint_cache() -> dict[str, str]:
    try:
        with open(storage.local_cache_dir("fingerprints.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _save_fingerprint_cache(known: dict[str, str]) -> None:
    with contextlib.suppress(OSError):  # a read-only home only costs re-hashing next time
        storage.write_text(storage.local_cache_dir("fingerprints.json"), json.dumps(known), durable=False)


def _sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_heldout(text: str, seed: int, fraction: float) -> bool:
    digest = hashlib.blake2b(f"{seed}\0{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


@dataclass
class PackedInfo:
    """Where packed blocks are and how many; returned by ``prepare`` to the driver."""

    uri: str
    seq_len: int
    dtype: str
    train_blocks: int
    heldout_blocks: int
    train_docs: int
    heldout_docs: int
    cached: bool = False

    @property
    def heldout_tokens(self) -> int:
        return self.heldout_blocks * self.seq_len

    @classmethod
    def from_dict(cls, values: dict) -> PackedInfo:
        """From a record's outputs, which also hold keys of other kinds (pid, node)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def cache_key(fp: str, tok_hash: str, seq_len: int, fraction: float, seed: int) -> str:
    payload = json.dumps([PACKING_VERSION, fp, tok_hash, seq_len, fraction, seed])
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def prepare(ds: DatasetSpec, tokenizer_uri: str, tok_hash: str, seq_len: int,
            heldout_fraction: float, split_seed: int, cache_root: str) -> PackedInfo:
    """Tokenize and pack one dataset (or reuse the cache) and return where it is.

    Raises:
        DataError: the data yields no training block or no held-out block.
    """
    key = cache_key(fingerprint(ds), tok_hash, seq_len, heldout_fraction, split_seed)
    uri = storage.join(cache_root, key)
    if checkpoint.is_published(uri):
        try:
            meta = json.loads(storage.read_text(storage.join(uri, "meta.json")))
            return PackedInfo(**meta, uri=uri, cached=True)
        except (OSError, TypeError, json.JSONDecodeError):
            pass  # an unreadable cache entry is rebuilt below
    from branchout.stages.tokenizer import load_tokenizer

    tok = load_tokenizer(checkpoint.fetch_verified(tokenizer_uri))
    docs = load_documents(ds)
    label = ds.path
    with tempfile.TemporaryDirectory(prefix="branchout-pack-") as tmp:
        flags = docs.map(
            lambda b: {"heldout": [is_heldout(t or "", split_seed, heldout_fraction) for t in b["text"]]},
            batched=True, keep_in_memory=True,
        )
        dtype = np.uint16 if len(tok) <= np.iinfo(np.uint16).max else np.uint32
        counts = {}
        for side, want in (("train", False), ("heldout", True)):
            part = flags.filter(lambda b, want=want: [h == want for h in b["heldout"]], batched=True, keep_in_memory=True)
            ids = part.map(
                lambda b: {"ids": [x + [tok.eos_token_id] for x in tok(b["text"], add_special_tokens=False)["input_ids"]]},
                batched=True, remove_columns=part.column_names, keep_in_memory=True,
            )
            blocks = _pack(ids, seq_len, dtype, os.path.join(tmp, f"{side}.bin"))
            counts[side] = (blocks, len(part))
        if counts["train"][0] == 0:
            raise DataError(f"{label}: too little text for one {seq_len}-token training block")
        if counts["heldout"][0] == 0:
            raise DataError(
                f"{label}: held-out split ({heldout_fraction:.0%} of {len(docs)} documents) is shorter "
                f"than one {seq_len}-token block; add data or raise evaluate.heldout_fraction"
            )
        info = PackedInfo(uri=uri, seq_len=seq_len, dtype=np.dtype(dtype).name,
                          train_blocks=counts["train"][0], heldout_blocks=counts["heldout"][0],
                          train_docs=counts["train"][1], heldout_docs=counts["heldout"][1])
        meta = {k: v for k, v in asdict(info).items() if k not in ("uri", "cached")}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        checkpoint.publish_dir(tmp, uri)
    return info


def _pack(ids_dataset, seq_len: int, dtype, out_path: str) -> int:
    """Stream token lists into ``seq_len`` blocks on disk; returns the block count."""
    carry = np.empty(0, dtype=np.int64)
    blocks = 0
    with open(out_path, "wb") as out:
        for batch in ids_dataset.iter(batch_size=1000):
            flat = [t for doc in batch["ids"] for t in doc]
            carry = np.concatenate([carry, np.asarray(flat, dtype=np.int64)])
            full = len(carry) // seq_len
            if full:
                out.write(carry[: full * seq_len].astype(dtype).tobytes())
                carry = carry[full * seq_len:]
                blocks += full
    return blocks


def open_blocks(info_uri: str, side: str, local_dir: str | None = None) -> np.ndarray:
    """Memory-map one side (``train`` or ``heldout``) as a ``[blocks, seq_len]`` array."""
    path = checkpoint.fetch_verified(info_uri, local_dir)
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    n = meta[f"{side}_blocks"]
    return np.memmap(os.path.join(path, f"{side}.bin"), dtype=meta["dtype"], mode="r",
                     shape=(n, meta["seq_len"]))
