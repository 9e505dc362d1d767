"""Data preflight: read every dataset before any worker starts.

Checks, per dataset: it exists and reads, the text column is there, it holds non-empty
strings that are not binary garbage, and both its training and held-out documents hold
enough text for at least one block. Instruction data (``stages.prepare.instruct``): its columns
are there, of the right type, not all empty, and both sides hold an example. The block check uses a bound that is certain for a
byte-level BPE (never more tokens than UTF-8 bytes, plus one EOS per document), so it
never rejects data that would have worked; the data stage repeats it with real tokens.

Reading is streamed (``stages.prepare.documents``) and stops as soon as the answer is known, so a
corpus of many GB costs its first read unit or two, not a pass over all of it.
"""

from __future__ import annotations

from branchout.core.graph import corpora
from branchout.core.spec import DatasetSpec, PipelineSpec

SAMPLE_ROWS = 1000
MAX_BAD_CHAR_RATIO = 0.01


def preflight(spec: PipelineSpec) -> tuple[list[str], list[str]]:
    """(problems, notes): problems stop the run; notes are printed."""
    from branchout.stages.prepare.data import DataError

    problems: list[str] = []
    notes: list[str] = []
    problems += _check_lm_eval_tasks(spec)
    checks = [(c.where, c.dataset, spec.pretrain.seq_len) for c in corpora(spec.pretrain)]
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
                notes.append(f"{where}: hub dataset {ds.path!r} is checked when the data stage streams it")
        if seen[key] and seen[key] != "hub":
            problems.append(f"{where}: {seen[key]}")
    return problems, notes


def check_dataset(ds: DatasetSpec, seq_len: int, fraction: float, seed: int) -> str | None:
    """A problem line for one dataset, ``"hub"`` for an unchecked hub dataset, or None.

    Raises:
        DataError: a file cannot be read (the message names it).
    """
    import pyarrow as pa

    from branchout.stages.prepare.documents import plan_units, resolve_source, unit_columns
    from branchout.stages.prepare.split import is_heldout

    if ds.is_instruction:
        from branchout.stages.prepare.instruct import check_instruct_dataset

        return check_instruct_dataset(ds, seq_len, fraction, seed)
    src = resolve_source(ds)
    if src.is_hub:
        return "hub"
    label = src.label
    sample: list[str] = []
    rows = 0
    bounds = {False: 0, True: 0}  # training / held-out token bounds
    kinds: set[str] = set()
    for unit in plan_units(ds):
        for values in unit_columns(unit, ds.text_column):
            rows += len(values)
            if pa.types.is_null(values.type):
                kinds.add("null")
                continue
            if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
                return f"{label}: column {ds.text_column!r} holds {values.type} values, not text"
            for text in values.to_pylist():
                if len(sample) < SAMPLE_ROWS:
                    sample.append(text or "")
                elif min(bounds.values()) >= seq_len:
                    break
                if text:
                    bounds[is_heldout(text, seed, fraction)] += len(text.encode()) + 1
        if len(sample) >= SAMPLE_ROWS and min(bounds.values()) >= seq_len:
            break
    if rows == 0:
        return f"{label}: dataset is empty"
    if not sample:
        return f"{label}: column {ds.text_column!r} holds {kinds.pop() if kinds else 'no'} values, not text"
    return _sample_problem(label, ds.text_column, sample) or _bound_problem(label, bounds, seq_len, fraction)


def _sample_problem(label: str, column: str, sample: list[str]) -> str | None:
    if not any(t.strip() for t in sample):
        return f"{label}: column {column!r} has no non-empty text in its first {SAMPLE_ROWS} rows"
    joined = "".join(sample)
    bad = sum(1 for c in joined if (ord(c) < 32 and c not in "\n\r\t") or c == "\ufffd")
    if bad / max(1, len(joined)) > MAX_BAD_CHAR_RATIO:
        return f"{label}: looks binary ({bad / len(joined):.0%} control or undecodable characters)"
    return None


def _bound_problem(label: str, bounds: dict[bool, int], seq_len: int, fraction: float) -> str | None:
    if bounds[False] < seq_len:
        return f"{label}: at most {bounds[False]} training tokens, less than one {seq_len}-token block"
    if bounds[True] < seq_len:
        return (f"{label}: held-out documents ({fraction:.0%}) hold at most {bounds[True]} tokens, "
                f"less than one {seq_len}-token block; add data or raise evaluate.heldout_fraction")
    return None


def _check_lm_eval_tasks(spec: PipelineSpec) -> list[str]:
    """``evaluate.lm_eval``: every task is one the harness knows (its own or ``include_path``'s),
    before any worker starts (indexing the harness's tasks takes seconds, so only when asked)."""
    import os

    options = spec.evaluate.lm_eval
    if options is None:
        return []
    if options.include_path and not os.path.isdir(options.include_path):
        return [f"evaluate.lm_eval.include_path: {options.include_path} is not a directory of task YAML files"]
    import logging

    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its indexing warns about its own task files
    known = set(TaskManager(include_path=options.include_path).all_tasks)
    unknown = [t for t in options.tasks if t not in known]
    if unknown:
        where = " or in include_path" if options.include_path else " (tasks of your own: include_path)"
        return [f"evaluate.lm_eval.tasks: {', '.join(unknown)}: not a task of lm-evaluation-harness{where}"]
    return []
