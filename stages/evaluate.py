"""Evaluate stage: held-out perplexity of each model on each domain.

Perplexity is exp(mean next-token negative log-likelihood) over the first
``max_blocks`` held-out blocks of the domain, the same blocks for every model, so the
numbers in one row are comparable. Models are scored in fp32 whatever they trained in.
"""

from __future__ import annotations

import math
import time


def perplexity(model, blocks, batch_size: int, max_blocks: int) -> tuple[float, int]:
    """(perplexity, tokens scored) of ``model`` on ``blocks`` ([n, seq_len] token ids)."""
    import numpy as np
    import torch

    model.eval()
    n = min(len(blocks), max_blocks)
    nll, count = 0.0, 0
    with torch.inference_mode():
        for i in range(0, n, batch_size):
            batch = torch.from_numpy(np.asarray(blocks[i:i + batch_size], dtype=np.int64))
            loss = model(input_ids=batch, labels=batch).loss
            predicted = batch.shape[0] * (batch.shape[1] - 1)  # the first token of a block has no target
            nll += float(loss) * predicted
            count += predicted
    return math.exp(nll / count), n * blocks.shape[1]


def load_for_scoring(model_uri: str, adapter_base_uri: str | None = None):
    """An HF model directory, or a PEFT adapter applied to its base model."""
    import torch
    from transformers import AutoModelForCausalLM

    from branchout.stages.checkpoint import fetch_verified

    path = fetch_verified(model_uri)
    if adapter_base_uri is None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(fetch_verified(adapter_base_uri), dtype=torch.float32)
    return PeftModel.from_pretrained(base, path)


def evaluate_domain(domain: str, data_uri: str, candidates: dict[str, tuple[str, str | None]],
                    batch_size: int, max_blocks: int, threads: int = 1) -> dict:
    """Score every candidate (name → (model uri, adapter base uri or None)) on one domain."""
    import torch

    from branchout.stages.data import open_blocks

    torch.set_num_threads(max(1, threads))
    started = time.time()
    blocks = open_blocks(data_uri, "heldout")
    out: dict = {"domain": domain, "started": started}
    for name, (uri, base) in candidates.items():
        ppl, tokens = perplexity(load_for_scoring(uri, base), blocks, batch_size, max_blocks)
        out[f"{name}_ppl"] = ppl
        out["heldout_tokens"] = tokens
    out["ended"] = time.time()
    return out
