"""Cross scoring (``evaluate.cross``): models scored on held-out text that is not their own.

A ``cross/<domain>`` job scores the domain's fine-tuned and from-scratch models on every
other domain's held-out blocks and on the general held-out text (the pretraining
corpus's): what a fine-tune forgot of the general text, and what it transfers to its
neighbours. ``cross/base`` scores the base on the general text. A model's own domain is
the evaluation job's (``stages.evaluation.evaluate``); the driver puts both in
``eval/metrics.json`` as ``cross``.

It runs from its graph node alone (``core.graph.Node.entry``): the node's section is the
domain's training options (its method and precision; the base's: the pretrain's), and
its parents by role are the models (``finetuned``, ``scratch``, ``base``) and the held-out
sets (``heldout:<set>``). Scoring is the evaluation's (same blocks, ``max_blocks``,
batch size, precision), one model in memory at a time, each on every set before the next
is loaded.
"""

from __future__ import annotations

import time

from branchout.stages.job import NodeJob

SET_ROLE = "heldout:"


def score_elsewhere(job: NodeJob) -> dict:
    """Returns ``{"ppl": {model: {set: perplexity}}, "heldout_tokens": {set: n}, "precision", ...}``;
    a model is named by the job that made it (``finetune/legal``), the base ``base``."""
    import torch

    from branchout.core.precision import decide, this_worker
    from branchout.stages.evaluation.evaluate import (
        load_for_scoring,
        perplexity,
        release,
        scoring_dtype,
    )
    from branchout.stages.prepare.data import open_blocks
    from branchout.stages.prepare.instruct import open_roles

    node, ev = job.node, job.spec.evaluate
    training = node.section
    torch.set_num_threads(job.threads)
    use_gpu = training.resources_per_worker.uses_gpu
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    decision = decide(training.deepspeed.precision, this_worker(device == "cuda"))
    if decision.warning:
        print(f"[branchout] {node.name}: {decision.warning}", flush=True)
    dtype = scoring_dtype(decision.used, device)
    started = time.time()
    sets = {role.removeprefix(SET_ROLE): out["uri"] for role, out in job.inputs.items() if role.startswith(SET_ROLE)}
    heldout = {name: (open_blocks(uri, "heldout"), open_roles(uri, "heldout")) for name, uri in sets.items()}
    models = [role for role in ("base", "finetuned", "scratch") if role in job.inputs]
    if node.domain is not None:  # a domain's job: its base is only the adapter's base, scored by cross/base
        models.remove("base")
    ppl: dict[str, dict[str, float]] = {}
    tokens: dict[str, int] = {}
    for role in models:
        uri = job.inputs[role]["model_uri"]
        adapter_base = job.inputs["base"]["model_uri"] if role == "finetuned" and training.method == "lora" else None
        model = load_for_scoring(uri, adapter_base, dtype, device)
        name = "base" if role == "base" else node.parents[role]
        ppl[name] = {}
        for set_name, (blocks, roles) in heldout.items():
            ppl[name][set_name], tokens[set_name] = perplexity(model, blocks, ev.batch_size, ev.max_blocks, roles)
        del model
        release()
    return {"ppl": ppl, "heldout_tokens": tokens, "precision": decision.as_dict(),
            "started": started, "ended": time.time()}
