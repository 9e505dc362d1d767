"""``evaluate.lm_eval``: EleutherAI's lm-evaluation-harness on the base and each fine-tune.

An ``lm_eval/<domain>`` job runs the pipeline's harness tasks on the domain's fine-tuned model
(a LoRA adapter merged into its base first: the harness takes one plain model);
``lm_eval/base`` on the base. Like ``cross`` it runs from its graph node alone
(``core.graph.Node.entry``) on its fine-tune's bundle, so on a GPU cluster it lands on the GPU
type the domain trains on, in the precision its workers decide. The harness gets the
loaded model object (``HFLM(pretrained=<model>)``): nothing is fetched by name, and task
data comes from the harness's own definitions or the pipeline's ``include_path``.
"""

from __future__ import annotations

import json
import time

from branchout.stages.job import NodeJob


def run_harness(job: NodeJob) -> dict:
    """Returns ``{"model": <name>, "scores": {task: {metric: value}}, "precision", ...}``; the
    harness's full results go to ``results.json`` in the job's folder."""
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from branchout import storage
    from branchout.core.precision import decide, this_worker
    from branchout.stages.evaluation.evaluate import load_for_scoring, scoring_dtype
    from branchout.stages.prepare.tokenizer import load_tokenizer
    from branchout.storage.checkpoint import fetch_verified

    node, options = job.node, job.spec.evaluate.lm_eval
    training = node.section  # the domain's options (its method and precision); the base's: the pretrain's
    torch.set_num_threads(job.threads)
    use_gpu = training.resources_per_worker.uses_gpu and torch.cuda.is_available()
    device = "cuda" if use_gpu else "cpu"
    decision = decide(training.deepspeed.precision, this_worker(use_gpu))
    started = time.time()
    base_uri = job.inputs["base"]["model_uri"]
    if "finetuned" in job.inputs:
        name = node.parents["finetuned"]
        adapter = training.method == "lora"
        model = load_for_scoring(job.inputs["finetuned"]["model_uri"], base_uri if adapter else None,
                                 scoring_dtype(decision.used, device), device)
        if adapter:
            model = model.merge_and_unload()
    else:
        name = "base"
        model = load_for_scoring(base_uri, None, scoring_dtype(decision.used, device), device)
    model.eval()
    tokenizer = load_tokenizer(fetch_verified(base_uri))  # the run's one tokenizer, saved with the base
    harness = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=options.batch_size, device=device)
    include = options.include_path
    if include and not storage.is_local(include):  # shipped by submit to object storage
        include = fetch_verified(include)
    elif include:
        include = storage.local_path(include)
    results = simple_evaluate(model=harness, tasks=list(options.tasks), num_fewshot=options.num_fewshot,
                              limit=options.limit, task_manager=TaskManager(include_path=include),
                              log_samples=False)
    storage.write_text(storage.join(job.out_uri, "results.json"),
                       json.dumps({"results": results["results"], "versions": results.get("versions")},
                                  indent=1, default=str))
    return {"model": name, "scores": scores_of(results["results"]), "precision": decision.as_dict(),
            "started": started, "ended": time.time()}


def scores_of(results: dict) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` of the harness's results: numbers only, ``acc,none`` → ``acc``
    (the filter is named when it is not the default)."""
    out: dict[str, dict[str, float]] = {}
    for task, row in results.items():
        for key, value in row.items():
            if not isinstance(value, int | float) or isinstance(value, bool) or key == "sample_len":
                continue
            metric, _, filt = key.partition(",")
            out.setdefault(task, {})[metric if filt in ("", "none") else f"{metric} ({filt})"] = float(value)
    return out
