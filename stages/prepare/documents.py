"""Documents: where a dataset's text is, how it is cut into read units, and how a unit is read.

A dataset is files (text, jsonl, parquet, csv; local paths or any pyarrow filesystem URI)
or a hub dataset. ``plan_units`` cuts it into *read units* of about ``unit_bytes``: byte
ranges of text and jsonl files, row-group ranges of parquet files, whole csv files (a
quoted field may hold a newline, so a csv file cannot be cut safely), and shards of a
streamed hub dataset. A unit is read on its own (``unit_texts``) by whichever worker gets
it, straight from storage with ranged reads, so memory is one unit, never the corpus.

Invariant: the documents of a dataset are the same whatever ``unit_bytes`` is. A byte range
``[start, stop)`` really covers ``[cut(start), cut(stop))``, where ``cut(x)`` is the first
record boundary at or after ``x`` (just after a newline for jsonl, just after a blank line
for text); neighbouring units share the boundary, so together they tile the file exactly.
In text files a document is a run of non-blank lines: blank lines separate documents.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import pyarrow as pa

from branchout import storage
from branchout.stages.prepare.units import DataError, ReadUnit  # noqa: F401  (re-exported: the data stage's errors)

if TYPE_CHECKING:  # the tokenizing actors import this module and never a spec: pydantic costs them ~0.12 s each
    from branchout.core.spec import DatasetSpec

UNIT_BYTES = 4 << 20  # the smallest read unit: ~2 s of tokenization on one core
TAPER_MIN_BYTES = 256 << 10  # the smallest tail piece (``taper``): ~0.1 s, ten times a unit's hand-over
_EXTENSION_FORMATS = {
    ".txt": "text", ".text": "text", ".md": "text", ".rst": "text",
    ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv",
}
_SEPARATOR = {"json": b"\n", "text": b"\n\n"}
_BLANK_LINES = re.compile(r"\n\s*\n")
_LEADING_BLANK = re.compile(r"^(?:[^\S\n]*\n)+")
_TRAILING_BLANK = re.compile(r"(?:\n[^\S\n]*)+$")


@dataclass
class Source:
    """What a dataset spec points at."""

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
        files = sorted(os.path.join(root, n) for root, _, names in os.walk(path) for n in names
                       if os.path.splitext(n)[1].lower() in _EXTENSION_FORMATS)
    elif os.path.isfile(path):
        files = [path]
    elif os.path.exists(path):  # a device, a FIFO, a socket: reading one may never end
        raise DataError(f"{path}: not a regular file or a directory")
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


def file_size(uri: str) -> int:
    if storage.is_local(uri):
        return os.path.getsize(storage.local_path(uri))
    fs, path = storage.filesystem(uri)
    return fs.get_file_info(path).size


def _open(uri: str):
    """A seekable binary handle: local file, or ranged reads from an object store."""
    if storage.is_local(uri):
        return open(storage.local_path(uri), "rb")  # noqa: SIM115 - closed by the caller
    fs, path = storage.filesystem(uri)
    return fs.open_input_file(path)


def plan_units(ds: DatasetSpec, unit_bytes: int = UNIT_BYTES) -> list[ReadUnit]:
    """The dataset cut into read units, in document order.

    Raises:
        DataError: no files, an unreadable parquet footer, or an unreachable hub dataset.
    """
    src = resolve_source(ds)
    if src.is_hub:
        from branchout.stages.training.hf_hub import hub_units

        return hub_units(src.builder, ds.split, ds.revision)
    units = []
    for f in src.files:
        size = file_size(f)
        if src.builder in _SEPARATOR and size > unit_bytes:
            units += [ReadUnit(src.builder, f, a, min(a + unit_bytes, size), min(unit_bytes, size - a))
                      for a in range(0, size, unit_bytes)]
        elif src.builder == "parquet":
            units += parquet_units(f, unit_bytes)
        else:
            units.append(ReadUnit(src.builder, f, 0, size, size))
    return units


def taper(units: list[ReadUnit], workers: int) -> list[ReadUnit]:
    """The last ``2 * workers`` units cut into pieces that shrink towards the end, where they
    are byte ranges (text, JSONL); other units are kept whole.

    Units go to whichever worker is free, two queued per worker, so in the last wave a worker
    can sit idle while another still has two units to go: up to two units' time. Each piece
    here is 1/(4 × workers) of the work left from its start (guided self-scheduling), at least
    ``TAPER_MIN_BYTES``, so what is still queued when a worker runs dry is a few of the
    smallest pieces. Ray timeline, 100 MB on 2 CPUs: the two workers' last units ended
    0.25-1.06 s apart with the tail cut in quarters, 0.07-0.36 s apart with these pieces.
    A document belongs to the unit its record starts in, so the output does not change.
    """
    tail = 2 * workers
    if workers < 2 or len(units) <= workers:
        return units
    out = units[:-tail]
    left = sum(u.size for u in units[-tail:])
    for u in units[-tail:]:
        if u.kind not in _SEPARATOR:
            out.append(u)
            left -= u.size
            continue
        start = u.start
        while start < u.stop:
            step = max(TAPER_MIN_BYTES, left // (4 * workers))
            stop = u.stop if u.stop - start < step + TAPER_MIN_BYTES else start + step  # no sliver at the end
            out.append(replace(u, start=start, stop=stop, size=stop - start))
            left -= stop - start
            start = stop
    return out


def parquet_units(uri: str, unit_bytes: int) -> list[ReadUnit]:
    import pyarrow.parquet as pq

    try:
        with _open(uri) as f:
            meta = pq.ParquetFile(f).metadata
    except Exception as e:  # pyarrow's message is what names the problem
        raise DataError(f"{uri}: not a Parquet file ({' '.join(str(e).split())[:160]})") from None
    if meta.num_rows == 0:
        raise DataError(f"{uri}: file is empty (0 rows)")
    units, first, size = [], 0, 0
    for g in range(meta.num_row_groups):
        size += meta.row_group(g).total_byte_size
        if size >= unit_bytes or g == meta.num_row_groups - 1:
            units.append(ReadUnit("parquet", uri, first, g + 1, size))
            first, size = g + 1, 0
    return units


def unit_texts(unit: ReadUnit, column: str) -> Iterator[list[str]]:
    """The non-empty documents of one unit, in batches, in file order.

    Raises:
        DataError: naming the file (and line or byte) that cannot be read, a missing column,
            or a column that does not hold text.
    """
    for values in unit_columns(unit, column):
        if pa.types.is_null(values.type):
            continue  # every row of this piece is null: no documents here
        if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
            raise DataError(f"{unit.path}: column {column!r} holds {values.type} values, not text")
        texts = [t for t in values.to_pylist() if t]
        if texts:
            yield texts


def unit_columns(unit: ReadUnit, column: str, setting: str = "text_column") -> Iterator[pa.Array]:
    """The raw ``column`` of one unit as arrow arrays (any type; ``unit_texts`` checks it).

    ``setting``: the dataset field that names the column, for the missing-column message.
    The batches are the same on every call, so columns read one after another line up.

    Raises:
        DataError: as ``unit_texts``.
    """
    if unit.kind == "hub":
        from branchout.stages.training.hf_hub import hub_columns

        yield from hub_columns(unit, column, setting)
    elif unit.kind == "parquet":
        yield from _parquet_columns(unit, column, setting)
    elif unit.kind == "csv":
        yield from _csv_columns(unit, column, setting)
    else:
        yield from _range_columns(unit, column, setting)


def missing_column(path: str, column: str, names: list[str], setting: str = "text_column") -> DataError:
    return DataError(f"{path}: no column {column!r} (columns: {', '.join(names)}); set dataset.{setting}")


def _range_columns(unit: ReadUnit, column: str, setting: str) -> Iterator[pa.Array]:
    if unit.size == 0 and unit.start == 0:
        raise DataError(f"{unit.path}: file is empty")
    size = file_size(unit.path)
    with _open(unit.path) as f:
        begin, end = _cut(f, unit.start, size, unit.kind), _cut(f, unit.stop, size, unit.kind)
        f.seek(begin)
        raw = f.read(end - begin)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{unit.path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                        f"{begin + e.start})") from None
    if unit.kind == "text":
        yield pa.array(split_paragraphs(text), type=pa.string())
    elif raw.strip():
        yield _parse_jsonl(raw, text, unit.path, begin, column, setting)


def _cut(f, pos: int, size: int, kind: str) -> int:
    """The first record boundary at or after ``pos``: just after the next separator."""
    sep = _SEPARATOR[kind]
    if pos <= 0 or pos >= size:
        return max(0, min(pos, size))
    at = max(0, pos - len(sep))  # a separator ending exactly at pos counts
    f.seek(at)
    tail = b""
    while True:
        chunk = f.read(1 << 16)
        if not chunk:
            return size
        buf = tail + chunk
        i = buf.find(sep)
        if i >= 0:
            return at - len(tail) + i + len(sep)
        tail = buf[-(len(sep) - 1):] if len(sep) > 1 else b""
        at += len(chunk)


def split_paragraphs(text: str) -> list[str]:
    """Documents of plain text: runs of non-blank lines (``\\r\\n`` read as ``\\n``)."""
    text = text.replace("\r\n", "\n")
    out = []
    for piece in _BLANK_LINES.split(text):
        piece = _TRAILING_BLANK.sub("", _LEADING_BLANK.sub("", piece))
        if piece.strip():
            out.append(piece)
    return out


def _parse_jsonl(raw: bytes, text: str, path: str, begin: int, column: str, setting: str) -> pa.Array:
    import pyarrow.json as pj

    try:
        table = pj.read_json(io.BytesIO(raw), read_options=pj.ReadOptions(
            use_threads=False, block_size=max(1 << 20, len(raw) + 1)))
    except pa.ArrowInvalid as e:
        raise DataError(_jsonl_problem(path, begin, text) or
                        f"{path}: cannot read ({' '.join(str(e).split())[:160]})") from None
    if column not in table.column_names:
        raise missing_column(path, column, table.column_names, setting)
    return table.column(column).combine_chunks()


def _jsonl_problem(path: str, begin: int, text: str) -> str | None:
    """The first line that is not a JSON object, numbered within the whole file."""
    first_line = 1
    if begin:
        with _open(path) as f:
            first_line += f.read(begin).count(b"\n")
    for number, line in enumerate(text.split("\n"), first_line):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            return f"{path}: line {number}, column {e.colno}: not valid JSON ({e.msg})"
        if not isinstance(row, dict):
            return f"{path}: line {number} is a JSON {type(row).__name__}, expected an object"
    return None


def _parquet_columns(unit: ReadUnit, column: str, setting: str) -> Iterator[pa.Array]:
    import pyarrow.parquet as pq

    with _open(unit.path) as f:
        pf = pq.ParquetFile(f)
        if column not in pf.schema_arrow.names:
            raise missing_column(unit.path, column, pf.schema_arrow.names, setting)
        for batch in pf.iter_batches(batch_size=4096, row_groups=range(unit.start, unit.stop),
                                     columns=[column], use_threads=False):
            yield batch.column(0)


def _csv_columns(unit: ReadUnit, column: str, setting: str) -> Iterator[pa.Array]:
    import pyarrow.csv as pcsv

    if unit.size == 0:
        raise DataError(f"{unit.path}: file is empty")
    try:
        with _open(unit.path) as f:
            reader = pcsv.open_csv(f, read_options=pcsv.ReadOptions(block_size=1 << 22))
            if column not in reader.schema.names:
                raise missing_column(unit.path, column, reader.schema.names, setting)
            for batch in reader:
                yield batch.column(reader.schema.get_field_index(column))
    except pa.ArrowInvalid as e:
        raise DataError(f"{unit.path}: not valid CSV ({' '.join(str(e).split())[:160]})") from None


def iter_documents(ds: DatasetSpec, unit_bytes: int = UNIT_BYTES) -> Iterator[str]:
    """Every non-empty document of ``ds`` in order, read unit by unit (memory: one unit).

    Raises:
        DataError: as ``plan_units`` and ``unit_texts``.
    """
    for unit in plan_units(ds, unit_bytes):
        for texts in unit_texts(unit, ds.text_column):
            yield from texts


def load_documents(ds: DatasetSpec):
    """The whole dataset as a ``datasets.Dataset`` with one ``text`` column.

    For small data and interactive use only: it holds every document. The pipeline streams
    (``plan_units``, ``unit_texts``).

    Raises:
        DataError: as ``iter_documents``.
    """
    import datasets

    return datasets.Dataset(pa.table({"text": pa.array(list(iter_documents(ds)), type=pa.string())}))
