"""Hand a domain's fine-tune to a server: a standalone HF model, or base + adapters.

``branchout export RUN --domain legal --out DIR`` writes:

- a **full** fine-tune: the model directory as it is (``--dtype`` casts it);
- a **LoRA** fine-tune with ``--merge``: the adapter merged into the base's weights, a
  standalone model ``AutoModelForCausalLM.from_pretrained(DIR)`` loads;
- a **LoRA** fine-tune without ``--merge``: ``DIR/base/`` (the parent model) and
  ``DIR/adapters/<domain>/`` (the PEFT adapter), the layout multi-LoRA servers take, e.g.
  ``vllm serve DIR/base --enable-lora --lora-modules legal=DIR/adapters/legal``.

Every input is verified against its manifest before it is read; the tokenizer is saved
beside each model so the directory is self-contained.
"""

from __future__ import annotations

import json
import os

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


class ExportError(ValueError):
    """The export cannot be made as asked; the message says why."""


def export_finetune(model_uri: str, base_uri: str | None, method: str, domain: str, out_dir: str,
                    merge: bool = False, dtype: str | None = None) -> list[str]:
    """Write ``domain``'s fine-tune under ``out_dir``; returns the model directories written.

    Raises:
        ExportError: ``out_dir`` is not empty, or the dtype is unknown.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ExportError(f"{out_dir} is not empty; export into a new directory")
    if method == "lora" and not merge:
        base_dir, adapter_dir = os.path.join(out_dir, "base"), os.path.join(out_dir, "adapters", domain)
        _save(_load(base_uri), _tokenizer(base_uri), base_dir, dtype)
        _copy_adapter(model_uri, adapter_dir)
        _write_layout(out_dir, domain)
        return [base_dir, adapter_dir]
    if method == "lora":
        from peft import PeftModel

        from branchout.storage.checkpoint import fetch_verified

        model = PeftModel.from_pretrained(_load(base_uri), fetch_verified(model_uri)).merge_and_unload()
    else:
        model = _load(model_uri)
    _save(model, _tokenizer(model_uri), out_dir, dtype)
    return [out_dir]


def _load(uri: str):
    import torch

    from branchout.stages.training.model import load_causal_lm
    from branchout.storage.checkpoint import fetch_verified

    # fp32 to merge exactly; the cast to the serving dtype happens once, at the end
    return load_causal_lm(fetch_verified(uri), dtype=torch.float32)


def _tokenizer(uri: str):
    from branchout.stages.prepare.tokenizer import load_tokenizer
    from branchout.storage.checkpoint import fetch_verified

    return load_tokenizer(fetch_verified(uri))


def _save(model, tokenizer, out_dir: str, dtype: str | None) -> None:
    import torch

    from branchout.stages.training.ds_files import without_deepspeed

    if dtype is not None:
        model = model.to(getattr(torch, DTYPES[dtype]))
    os.makedirs(out_dir, exist_ok=True)
    with without_deepspeed():  # `branchout export` holds no DeepSpeed engine: no seconds importing it
        model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _copy_adapter(uri: str, out_dir: str) -> None:
    import shutil

    from branchout.storage.checkpoint import MANIFEST, fetch_verified

    shutil.copytree(fetch_verified(uri), out_dir, ignore=shutil.ignore_patterns(MANIFEST))


def _write_layout(out_dir: str, domain: str) -> None:
    layout = {"base": "base", "adapters": {domain: f"adapters/{domain}"},
              "serve": f"vllm serve {out_dir}/base --enable-lora --lora-modules {domain}={out_dir}/adapters/{domain}"}
    with open(os.path.join(out_dir, "branchout-export.json"), "w") as f:
        json.dump(layout, f, indent=1)
