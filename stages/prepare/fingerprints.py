"""Identity of a dataset's content (for caches and lineage), and naming what is wrong with it.

A fingerprint hashes file paths and content hashes (local files), URI, size and
modification time (object-store files), or the hub dataset's name and the *commit* its
revision resolves to, so "main" moving on the hub is a change of data.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os

from branchout import storage
from branchout.core.spec import DatasetSpec
from branchout.stages.prepare.documents import (
    DataError,
    ReadUnit,
    Source,
    file_size,
    parquet_units,
    resolve_source,
    unit_columns,
)


def fingerprint(ds: DatasetSpec) -> str:
    """Identity of the data: file paths, sizes and content hashes; hub name and commit.

    Content hashes are remembered per (path, size, modification time) in
    ``fingerprints.json`` of the local cache (``storage.local_cache_dir``), so only files
    that changed are read again.

    Raises:
        DataError: the files cannot be found, or a hub dataset cannot be reached.
    """
    src = resolve_source(ds)
    revision = ds.revision
    if src.is_hub:
        from branchout.stages.training.hf_hub import hub_commit

        revision = hub_commit(src.builder, ds.revision)
    what = [src.builder, ds.text_column, ds.split, revision]
    if ds.is_instruction:  # appended, so plain datasets keep the fingerprints (and caches) they had
        what += [ds.prompt_column, ds.response_column, ds.messages_column]
    h = hashlib.sha256(json.dumps(what).encode())
    known = _load_cache()
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
            known[ident] = storage.sha256_file(f)
            changed = True
        h.update(os.path.abspath(f).encode())
        h.update(known[ident].encode())
    if changed:
        _save_cache(known)
    return h.hexdigest()


def _load_cache() -> dict[str, str]:
    try:
        with open(storage.local_cache_dir("fingerprints.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _save_cache(known: dict[str, str]) -> None:
    with contextlib.suppress(OSError):  # a read-only home only costs re-hashing next time
        storage.write_text(storage.local_cache_dir("fingerprints.json"), json.dumps(known), durable=False)


def diagnose(src: Source, column: str = "text") -> str | None:
    """The line naming the first file (and line or byte) that cannot be read, or None.

    Reads every file whole, one at a time: for messages about small or sampled data.
    """
    for f in src.files:
        size = file_size(f)
        try:
            if src.builder == "parquet":
                units = parquet_units(f, 1 << 62)
            else:
                units = [ReadUnit(src.builder, f, 0, size, size)]
            for unit in units:
                for _ in unit_columns(unit, column):
                    pass
        except DataError as e:
            return str(e)
    return None
