"""Evaluate stage: held-out perplexity of each model on each domain, one job per domain.

Perplexity is exp(mean next-token negative log-likelihood) over the first
``max_blocks`` held-out blocks of the domain (instruction data: over the answer tokens of
its first ``max_blocks`` held-out examples), the same blocks for every model, so the
numbers in one row are comparable. Every model also answers the same held-out prompts
greedily (``stages.evaluation.generation``): scored by exact match and ROUGE-L on instruction data,
shown in the report for every domain.

The job runs where the domain's fine-tune ran (its resources: GPUs, accelerator type,
CPUs; the driver places it) and scores in the domain's training precision (``auto``
decided on this worker as it is on the fine-tune's, ``core.precision``): a 7B model is
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

from branchout.stages.job import EvalJob


def scoring_dtype(precision: str, device: str):
    """bf16 and fp32 score as they trained; fp16 only on a GPU (CPUs have no fast fp16).
    ``precision`` is a decided one (``core.precision.decide``), never auto."""
    import torch

    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16" and device.startswith("cuda"):
        return torch.float16
    return torch.float32


def perplexity(model, blocks, batch_size: int, max_blocks: int, roles=None) -> tuple[float, int]:
    """(perplexity, tokens scored) of ``model`` on ``blocks`` ([n, seq_len] token ids).

    ``roles`` (instruction data, ``stages.prepare.instruct``): only answer tokens are scored and
    padding is not attended; the tokens scored are then the answers' tokens. Batches go to
    the model's device; the loss is summed there and read once.
    """
    import numpy as np
    import torch

    from branchout.stages.prepare.instruct import model_inputs

    model.eval()
    device = next(model.parameters()).device
    n = min(len(blocks), max_blocks)
    nll = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    with torch.inference_mode():
        for i in range(0, n, batch_size):
            j = min(i + batch_size, n)
            ids = torch.from_numpy(np.asarray(blocks[i:j], dtype=np.int64))
            batch = ids if roles is None else (ids, torch.from_numpy(np.asarray(roles[i:j], dtype=np.int64)))
            inputs = model_inputs(batch, device)
            loss = model(**inputs).loss  # the mean over predicted tokens
            predicted = (inputs["labels"][:, 1:] != -100).sum()  # a row's first token has no target
            # a batch with no answer token has a NaN mean; it adds nothing
            nll += torch.where(predicted > 0, loss.double() * predicted, torch.zeros_like(nll))
            count += predicted
    scored = int(count.item())
    return math.exp(nll.item() / max(scored, 1)), (scored if roles is not None else n * blocks.shape[1])


def load_for_scoring(model_uri: str, adapter_base_uri: str | None = None, dtype=None, device: str = "cpu"):
    """An HF model directory, or a PEFT adapter applied to its base model, on ``device``.

    On a GPU the weights are loaded shard by shard straight onto it (``device_map``), so
    the host never holds the whole model.
    """
    import torch

    from branchout.stages.training.model import load_causal_lm
    from branchout.storage.checkpoint import fetch_verified

    dtype = dtype or torch.float32
    placement = {"device_map": {"": device}} if device != "cpu" else {}
    base = load_causal_lm(fetch_verified(adapter_base_uri or model_uri), dtype=dtype, **placement)
    if adapter_base_uri is None:
        return base
    from peft import PeftModel

    return PeftModel.from_pretrained(base, fetch_verified(model_uri))


def evaluate_domain(job: EvalJob) -> dict:
    """Score every candidate of ``job`` (a full model, or adapters over a base) on its domain.

    Candidates are scored in their order; a LoRA candidate whose base is the model just
    scored reuses it. With ``generation_samples`` (and the run's ``tokenizer_uri``) every
    candidate also answers the same held-out prompts greedily (``stages.evaluation.generation``).

    Returns:
        ``{"domain", "<name>_ppl"…, "heldout_tokens", "started", "ended"}``, plus for
        instruction data ``"<name>_exact_match"``/``"<name>_rouge_l"`` and, with generation,
        ``"samples"``: the first few prompts with each candidate's answer.
    """
    import torch

    from branchout.core.precision import decide, this_worker
    from branchout.stages.evaluation.generation import Generations
    from branchout.stages.prepare.data import open_blocks
    from branchout.stages.prepare.instruct import open_roles

    torch.set_num_threads(max(1, job.threads))
    device = "cuda" if job.use_gpu and torch.cuda.is_available() else "cpu"
    decision = decide(job.precision, this_worker(device == "cuda"))  # `auto` decided on this worker
    if decision.warning:
        print(f"[branchout] evaluate/{job.domain}: {decision.warning}", flush=True)
    dtype = scoring_dtype(decision.used, device)
    started = time.time()
    blocks = open_blocks(job.data_uri, "heldout")
    roles = open_roles(job.data_uri, "heldout")
    gen = (Generations(job.data_uri, job.tokenizer_uri, blocks, roles is not None, job.generation_samples,
                       job.max_new_tokens)
           if job.generation_samples and job.tokenizer_uri else None)
    out: dict = {"domain": job.domain, "started": started, "precision": decision.as_dict()}

    def score(name: str, model) -> None:
        out[f"{name}_ppl"], out["heldout_tokens"] = perplexity(model, blocks, job.batch_size, job.max_blocks, roles)
        if gen is not None:
            out.update({f"{name}_{k}": v for k, v in gen.answer(name, model).items()})

    loaded_uri, model = None, None  # the plain model in memory, if any
    for name, candidate in job.candidates.items():
        uri, adapter_base = candidate.model_uri, candidate.adapter_base_uri
        if adapter_base is not None and adapter_base == loaded_uri:
            from peft import PeftModel

            from branchout.storage.checkpoint import fetch_verified

            scored = PeftModel.from_pretrained(model, fetch_verified(uri))
            score(name, scored)
            model = scored.unload()  # the adapter's layers out again: the base as it was loaded
            continue
        model = loaded_uri = None
        release()  # one model at a time
        scored = load_for_scoring(uri, adapter_base, dtype, device)
        score(name, scored)
        if adapter_base is None:
            loaded_uri, model = uri, scored
        del scored
    del model
    release()
    if gen is not None:
        out["samples"] = gen.shown()
        out.update(gen.majority())
    out["ended"] = time.time()
    return out


def release() -> None:
    """Free the previous model's memory before the next one is loaded."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
