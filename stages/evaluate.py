"""Evaluate stage: held-out perplexity of each model on each domain, one job per domain.

Perplexity is exp(mean next-token negative log-likelihood) over the first
``max_blocks`` held-out blocks of the domain, the same blocks for every model, so the
numbers in one row are comparable.

The job runs where the domain's fine-tune ran (its resources: GPUs, accelerator type,
CPUs; the driver places it) and scores in the domain's training precision: a 7B model is
13.5 GB in bf16 and would be 27 GB in fp32, and a bf16 model's fp32 scores are not what
it was trained to produce. The base, fine-tuned and scratch models of a domain are scored
one after another in the one job, each released before the next is loaded, so the job
needs memory for one model at a time; a LoRA fine-tune is scored on the base model that
is already loaded, with its adapter applied and then removed again. Batches stay on the
device and the summed loss is read to the host once per model.
"""

from __future__ import annotations

import math
import time


def scoring_dtype(precision: str, device: str):
    """bf16 and fp32 score as they trained; fp16 only on a GPU (CPUs have no fast fp16)."""
    import torch

    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16" and device.startswith("cuda"):
        return torch.float16
    return torch.float32


def perplexity(model, blocks, batch_size: int, max_blocks: int) -> tuple[float, int]:
    """(perplexity, tokens scored) of ``model`` on ``blocks`` ([n, seq_len] token ids).

    Batches go to the model's device; the loss is summed there and read once.
    """
    import numpy as np
    import torch

    model.eval()
    device = next(model.parameters()).device
    n = min(len(blocks), max_blocks)
    nll = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    with torch.inference_mode():
        for i in range(0, n, batch_size):
            batch = torch.from_numpy(np.asarray(blocks[i:min(i + batch_size, n)], dtype=np.int64)).to(device)
            loss = model(input_ids=batch, labels=batch).loss  # the mean over predicted tokens
            predicted = batch.shape[0] * (batch.shape[1] - 1)  # the first token of a block has no target
            nll += loss.double() * predicted
            count += predicted
    return math.exp(nll.item() / count), n * blocks.shape[1]


def load_for_scoring(model_uri: str, adapter_base_uri: str | None = None, dtype=None, device: str = "cpu"):
    """An HF model directory, or a PEFT adapter applied to its base model, on ``device``.

    On a GPU the weights are loaded shard by shard straight onto it (``device_map``), so
    the host never holds the whole model.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from branchout.stages.checkpoint import fetch_verified

    dtype = dtype or torch.float32
    placement = {"device_map": {"": device}} if device != "cpu" else {}
    base = AutoModelForCausalLM.from_pretrained(fetch_verified(adapter_base_uri or model_uri), dtype=dtype,
                                                **placement)
    if adapter_base_uri is None:
        return base
    from peft import PeftModel

    return PeftModel.from_pretrained(base, fetch_verified(model_uri))


def evaluate_domain(domain: str, data_uri: str, candidates: dict[str, tuple[str, str | None]],
                    batch_size: int, max_blocks: int, threads: int = 1, precision: str = "fp32",
                    use_gpu: bool = False) -> dict:
    """Score every candidate (name → (model uri, adapter base uri or None)) on one domain.

    Candidates are scored in their order; a LoRA candidate whose base is the model just
    scored reuses it. Returns ``{"domain", "<name>_ppl"…, "heldout_tokens", "started", "ended"}``.
    """
    import torch

    from branchout.stages.data import open_blocks

    torch.set_num_threads(max(1, threads))
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    dtype = scoring_dtype(precision, device)
    started = time.time()
    blocks = open_blocks(data_uri, "heldout")
    out: dict = {"domain": domain, "started": started}
    loaded_uri, model = None, None  # the plain model in memory, if any
    for name, (uri, adapter_base) in candidates.items():
        if adapter_base is not None and adapter_base == loaded_uri:
            from peft import PeftModel

            from branchout.stages.checkpoint import fetch_verified

            scored = PeftModel.from_pretrained(model, fetch_verified(uri))
            out[f"{name}_ppl"], out["heldout_tokens"] = perplexity(scored, blocks, batch_size, max_blocks)
            model = scored.unload()  # the adapter's layers out again: the base as it was loaded
            continue
        model = loaded_uri = None
        _release()  # one model at a time
        scored = load_for_scoring(uri, adapter_base, dtype, device)
        out[f"{name}_ppl"], out["heldout_tokens"] = perplexity(scored, blocks, batch_size, max_blocks)
        if adapter_base is None:
            loaded_uri, model = uri, scored
        del scored
    del model
    _release()
    out["ended"] = time.time()
    return out


def _release() -> None:
    """Free the previous model's memory before the next one is loaded."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
