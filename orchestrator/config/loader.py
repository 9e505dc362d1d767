"""Load a pipeline file: YAML → ``--set`` overrides → pydantic → cross-field checks.

Every problem found is collected into one ``SpecError`` whose lines each name the file
and the field path, so a user fixes a file in one pass. Relative dataset and tokenizer
paths are resolved against the directory of the pipeline file, which is what lets the
same file run from any working directory (and, submitted, from a Ray job's).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from branchout.core.spec import PipelineSpec


class SpecError(ValueError):
    """A pipeline file is invalid. ``problems`` holds one line per problem."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


def load_spec(path: str | os.PathLike[str], overrides: list[str] | None = None) -> PipelineSpec:
    """Read, override, validate and cross-check a pipeline file.

    Args:
        path: the YAML file.
        overrides: ``key.path=value`` strings; values are parsed as YAML scalars/lists.

    Raises:
        SpecError: naming the file and every invalid field.
    """
    source = str(path)
    raw = read_yaml(path)
    apply_overrides(raw, overrides or [], source)
    resolve_paths(raw, Path(path).resolve().parent)
    return validate_spec(raw, source)


# A pipeline file is a page of settings. These bounds refuse hostile or broken input (a
# "billion laughs" of nested aliases, thousands of nested brackets, a data file passed by
# mistake) in well under a second, before pydantic would walk it for minutes.
MAX_FILE_BYTES = 1 << 20
MAX_VALUES = 100_000  # scalars, lists and mappings after aliases are expanded
MAX_DEPTH = 64


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the
    last silently: a setting written twice would be half ignored)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    source = str(path)
    try:
        if Path(path).exists() and not Path(path).is_dir() and not Path(path).is_file():
            # /dev/zero, a FIFO, a socket: getsize says 0 and a read never ends
            raise SpecError(source, ["not a regular file (a device, pipe or socket?)"])
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)  # bounded whatever the file claims to be
        if len(data) > MAX_FILE_BYTES:
            raise SpecError(source, [f"file is over {MAX_FILE_BYTES >> 20} MiB; a pipeline file is at most "
                                     f"{MAX_FILE_BYTES >> 20} MiB (is this a data file?)"])
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise SpecError(source, ["file not found"]) from None
    except IsADirectoryError:
        raise SpecError(source, ["is a directory, not a pipeline file"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(source, [f"cannot read: {e}"]) from None
    try:
        _check_depth(text, source)
        raw = yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(source, [f"{where}invalid YAML: {problem}"]) from None
    check_shape(raw, source)
    if raw is None:
        raise SpecError(source, ["file is empty"])
    if not isinstance(raw, dict):
        raise SpecError(source, ["top level must be a mapping of sections (name, pretrain, ...)"])
    return raw


def _check_depth(text: str, source: str) -> None:
    """Nesting depth from the parser's events, before PyYAML's recursive composer sees it."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise SpecError(source, [f"nested deeper than {MAX_DEPTH} levels"])
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def check_shape(raw: Any, source: str) -> None:
    """Refuse documents that are too deep or expand (through aliases) to too many values.

    Aliases share one Python object, so the walk below counts what an expanded copy would
    hold, and stops at the first bound it crosses instead of walking all of it.

    Raises:
        SpecError: naming the bound.
    """
    seen = 0
    stack: list[tuple[Any, int]] = [(raw, 1)]
    while stack:
        node, depth = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            raise SpecError(source, [f"expands to more than {MAX_VALUES:,} values (nested YAML aliases?); "
                                     "a pipeline file is a page of settings"])
        if depth > MAX_DEPTH:
            raise SpecError(source, [f"nested deeper than {MAX_DEPTH} levels"])
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for kv in node.items() for v in kv)
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


def validate_spec(raw: dict[str, Any], source: str) -> PipelineSpec:
    """Validate an already-read mapping; see ``load_spec``."""
    from branchout.orchestrator.config.checks import cross_check
    from branchout.orchestrator.config.plan import (
        check_packing,
        resolve_auto_zero,
        size_farms,
        suggest_micro_batches,
    )

    try:
        spec = PipelineSpec.model_validate(raw)
    except ValidationError as e:
        raise SpecError(source, format_validation_errors(e, raw)) from None
    problems = cross_check(spec)
    if problems:
        raise SpecError(source, problems)
    problems, notes = resolve_auto_zero(spec)
    problems += check_packing(spec)
    if problems:
        raise SpecError(source, problems)
    spec.notes.extend(notes)
    spec.notes.extend(size_farms(spec))
    spec.notes.extend(suggest_micro_batches(spec))
    if spec.pretrain.probes and spec.pretrain.schedule.kind != "wsd":
        spec.notes.append("pretrain.probes: schedule.kind: wsd is recommended: under cosine the learning rate at a "
                          "probe point depends on the whole budget, so early probes see a model mid-decay")
    if spec.pretrain.datasets:
        from branchout.core.graph import corpora

        shares = ", ".join(f"{c.key.split('/', 1)[1]} {c.weight:.0%}" for c in corpora(spec.pretrain))
        spec.notes.append(f"pretrain.datasets: a mixture of {shares} of the training blocks (each source "
                          "tokenized and held out on its own; its held-out set is general/<source>)")
    return spec


def apply_overrides(raw: dict[str, Any], overrides: list[str], source: str) -> None:
    """Apply ``a.b.c=value`` in place; list items are addressed by index (``domains.0.steps``)."""
    problems = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"--set {item!r}: expected key.path=value")
            continue
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            parsed = value
        try:
            _set_path(raw, key.strip().split("."), parsed)
        except (KeyError, IndexError, TypeError) as e:
            problems.append(f"--set {key}: {e.args[0] if e.args else e}")
    if problems:
        raise SpecError(source, problems)


def _set_path(node: Any, parts: list[str], value: Any) -> None:
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise IndexError(f"no list item {part!r} (list has {len(node)} items)")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise TypeError(f"{'.'.join(parts[:i])} is a value, not a section")


def resolve_paths(raw: dict[str, Any], base: Path) -> None:
    """Make relative local paths absolute against the pipeline file's directory."""

    def fix_dataset(ds: Any) -> None:
        if isinstance(ds, dict) and isinstance(ds.get("path"), str) and ds.get("format") != "hub":
            ds["path"] = _absolute(ds["path"], base)

    pretrain = raw.get("pretrain")
    if isinstance(pretrain, dict):
        fix_dataset(pretrain.get("dataset"))
        for source in pretrain.get("datasets") if isinstance(pretrain.get("datasets"), list) else []:
            fix_dataset(source)
    finetune = raw.get("finetune")
    if isinstance(finetune, dict) and isinstance(finetune.get("domains"), list):
        for domain in finetune["domains"]:
            if isinstance(domain, dict):
                fix_dataset(domain.get("dataset"))
    harness = (raw.get("evaluate") or {}).get("lm_eval") if isinstance(raw.get("evaluate"), dict) else None
    if isinstance(harness, dict) and isinstance(harness.get("include_path"), str):
        harness["include_path"] = _absolute(harness["include_path"], base)
    tok = raw.get("tokenizer")
    if isinstance(tok, dict) and isinstance(tok.get("path"), str):
        tok["path"] = _absolute(tok["path"], base)
    model = raw.get("model")
    if isinstance(model, dict) and isinstance(model.get("path"), str):
        # "org/name" is a hub id unless such a folder exists here
        local = _absolute(model["path"], base)
        model["path"] = local if os.path.exists(local) else model["path"]
    if isinstance(raw.get("storage"), str):
        raw["storage"] = _absolute(raw["storage"], base)


def _absolute(path: str, base: Path) -> str:
    if "://" in path or os.path.isabs(path):
        return path
    expanded = os.path.expanduser(path)
    if expanded != path:
        return expanded
    candidate = base / path
    # A bare word that is not a local path may be a hub dataset name ("wikitext").
    if not candidate.exists() and "/" not in path and "." not in path:
        return path
    return str(candidate.resolve())


_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "required field is missing",
}


def format_validation_errors(error: ValidationError, raw: dict[str, Any]) -> list[str]:
    """One line per pydantic error: ``field.path: message (got value)``.

    A domain inherits the defaults, so a bad default would otherwise be reported once
    per domain; such echoes are dropped and only ``finetune.defaults.*`` is reported.
    """
    lines: list[str] = []
    for err in error.errors(include_url=False):
        loc = [str(p) for p in err["loc"]]
        if _echo_of_default(loc, raw):
            continue
        # pydantic adds the failing union member / validator name; users want the field.
        loc = [p for p in loc if not p.startswith("function-") and p not in ("tagged-union",)]
        path = ".".join(loc) or "(top level)"
        msg = _MESSAGES.get(err["type"], err["msg"])
        msg = msg.removeprefix("Value error, ")
        if err["type"] not in ("missing", "extra_forbidden") and "input" in err:
            shown = repr(err["input"])
            if len(shown) > 60:
                shown = shown[:57] + "..."
            if not isinstance(err["input"], dict | list):
                msg = f"{msg} (got {shown})"
        lines.append(f"{path}: {msg}")
    return list(dict.fromkeys(lines))


def _echo_of_default(loc: list[str], raw: dict[str, Any]) -> bool:
    if len(loc) < 4 or loc[:2] != ["finetune", "domains"] or not loc[2].isdigit():
        return False
    finetune = raw.get("finetune")
    if not isinstance(finetune, dict):
        return False
    domains, defaults = finetune.get("domains"), finetune.get("defaults")
    index = int(loc[2])
    if not isinstance(domains, list) or not isinstance(defaults, dict) or index >= len(domains):
        return False
    return isinstance(domains[index], dict) and loc[3] not in domains[index] and loc[3] in defaults
