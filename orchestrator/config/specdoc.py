"""Render the spec reference (docs/spec.md) from the pydantic models themselves.

    python -m branchout.orchestrator.config.specdoc > docs/spec.md

A test compares the file with this output, so the reference cannot drift from the code.
"""

from __future__ import annotations

import typing

from pydantic import BaseModel

from branchout.core.spec import PipelineSpec

HEADER = """# Pipeline spec reference

Generated from `core/spec.py` by `python -m branchout.orchestrator.config.specdoc`.
Unknown keys are errors. Relative paths are relative to the pipeline file.
`finetune.domains[*]` accept every field of `finetune.defaults` and override it
(nested sections merge key by key). Cross-field rules (batch divisibility, ZeRO options
vs. precision and device, sequence length vs. model positions, LoRA targets) are
checked together with these, and every problem is reported at once.
"""


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin is None:
        return getattr(annotation, "__name__", str(annotation)).replace("NoneType", "null")
    args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
    name = getattr(origin, "__name__", str(origin)).replace("UnionType", "Union")
    if name in ("Union", "UnionType"):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if name == "Literal":
        return " or ".join(repr(a) for a in typing.get_args(annotation))
    return f"{name}[{args}]"


def _nested(annotation) -> type[BaseModel] | None:
    """The pydantic model inside ``X``, ``X | None`` or ``list[X]``, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _nested(arg)
        if found:
            return found
    return None


def render(model: type[BaseModel] = PipelineSpec, prefix: str = "") -> list[str]:
    rows, nested = [], []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
        sub = _nested(field.annotation)
        if sub is not None:
            nested.append((path + ("[*]" if typing.get_origin(field.annotation) is list else ""), sub))
            default = "see below" if not field.is_required() else "required"
        doc = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{path}` | {_type_name(field.annotation)} | {default} | {doc} |")
    title = prefix.rstrip(".") or "top level"
    out = [f"## `{title}`", "", (model.__doc__ or "").strip().split("\n\n")[0].replace("\n", " "), "",
           "| field | type | default | meaning |", "|---|---|---|---|", *rows, ""]
    for path, sub in nested:
        out += render(sub, path + ".")
    return out


def main() -> None:
    print(HEADER)
    print("\n".join(render()))


if __name__ == "__main__":
    main()
