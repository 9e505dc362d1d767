"""Data preflight: read every dataset before any worker starts.

Checks, per dataset: it exists and loads, the text column is there, it holds non-empty
strings that are not binary garbage, and both its training and held-out documents hold
enough text for at least one block. The block check uses a bound that is certain for a
byte-level BPE (never more tokens than UTF-8 bytes, plus one EOS per document), so it
never rejects data that would have worked; the data stage repeats it with real tokens.
"""

from __future__ import annotations

from branchout.orchestrator.spec import DatasetSpec, PipelineSpec

SAMPLE_ROWS = 1000
MAX_BAD_CHAR_RATIO = 0.01


def preflight(spec: PipelineSpec) -> tuple[list[str], list[str]]:
    """(problems, notes): problems stop the run; notes are printed."""
    from branchout.stages.data import DataError

    problems: list[str] = []
    notes: list[str] = []
    checks = [("pretrain.dataset", spec.pretrain.dataset, spec.pretrain.seq_len)]
    checks += [(f"finetune.domains.{i}.dataset", d.dataset, spec.domain_seq_len(d))
               for i, d in enumerate(spec.finetune.domains)]
    seen: dict[tuple, str | None] = {}
    for where, ds, seq_len in checks:
        key = (ds.model_dump_json(), seq_len)
        if key not in seen:
            try:
                seen[key] = check_dataset(ds, seq_len, spec.evaluate.heldout_fraction, spec.evaluate.split_seed)
            except DataError as e:
                seen[key] = str(e)
            if seen[key] == "hub":
                notes.append(f"{where}: hub dataset {ds.path!r} is checked when the data stage loads it")
        if seen[key] and seen[key] != "hub":
            problems.append(f"{where}: {seen[key]}")
    return problems, notes


def check_dataset(ds: DatasetSpec, seq_len: int, fraction: float, seed: int) -> str | None:
    """A problem line for one dataset, ``"hub"`` for an unchecked hub dataset, or None."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from branchout.stages.data import is_heldout, load_documents, resolve_source

    src = resolve_source(ds)
    if src.is_hub:
        return "hub"
    docs = load_documents(ds)
    label = src.label
    if len(docs) == 0:
        return f"{label}: dataset is empty"
    column = docs.data.column("text")
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return f"{label}: column {ds.text_column!r} holds {column.type} values, not text"
    sample = [t for t in docs.select(range(min(SAMPLE_ROWS, len(docs))))["text"] if t]
    if not any(t.strip() for t in sample):
        return f"{label}: column {ds.text_column!r} has no non-empty text in its first {SAMPLE_ROWS} rows"
    joined = "".join(sample)
    bad = sum(1 for c in joined if (ord(c) < 32 and c not in "\n\r\t") or c == "\ufffd")
    if bad / max(1, len(joined)) > MAX_BAD_CHAR_RATIO:
        return f"{label}: looks binary ({bad / len(joined):.0%} control or undecodable characters)"
    lengths = pc.fill_null(pc.binary_length(column.cast(pa.large_binary())), 0).to_pylist()
    train_bound = heldout_bound = 0
    for text, n in zip(docs["text"], lengths, strict=True):
        if is_heldout(text or "", seed, fraction):
            heldout_bound += n + 1
        else:
            train_bound += n + 1
    if train_bound < seq_len:
        return f"{label}: at most {train_bound} training tokens, less than one {seq_len}-token block"
    if heldout_bound < seq_len:
        return (f"{label}: held-out documents ({fraction:.0%}) hold at most {heldout_bound} tokens, "
                f"less than one {seq_len}-token block; add data or raise evaluate.heldout_fraction")
    return None
