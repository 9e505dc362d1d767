"""Evaluation jobs: placed like the domain's fine-tune, scoring in its precision, one job per domain.

A local Ray that declares one GPU and an H100 accelerator type stands in for a GPU node
(Ray places by resources; on this CPU-only machine the job then scores on the CPU, as
every GPU job here does). The driver submits an evaluation with ``submit_task`` and the
plan's bundle for it; the tests do the same.
"""

from __future__ import annotations

from conftest import REPO

H100_NODE = {"accelerator_type:H100": 1.0}


def test_evaluation_jobs_carry_the_domains_resources():
    from branchout.orchestrator.config.loader import load_spec
    from branchout.orchestrator.config.plan import build_plan

    for example, bundle in (("llama-1b.yaml", {"CPU": 4.0, "GPU": 1.0, "accelerator_type:H100": 0.001}),
                            ("llama-7b.yaml", {"CPU": 2.0, "GPU": 0.5, "accelerator_type:H100": 0.001}),
                            ("quickstart.yaml", {"CPU": 1.0})):
        spec = load_spec(REPO / "examples" / example)
        plan = build_plan(spec)
        for d in spec.finetune.domains:
            assert plan.job(f"evaluate/{d.name}").resources == bundle == d.resources_per_worker.ray_bundle()
            assert plan.job(f"evaluate/{d.name}").resources == plan.job(f"finetune/{d.name}").resources
