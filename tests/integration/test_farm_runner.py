"""The farm as the fan-out runs it: a Ray actor, each member its own call, result and files.

Three LoRA members trained in one ``FarmRunner`` against the same three jobs trained alone
by the lone path (``run_single_worker``), fp32: the same final losses, the same adapters on
disk (loadable by peft), the same held-out perplexity, the lone checkpoint layout. Then the
farm is SIGKILLed mid-way (a planned fault): every member's call fails, and each, retried
alone, resumes from its own newest checkpoint (redoing fewer than ``checkpoint_every``
steps) and ends where the uninterrupted run ends.
"""

from __future__ import annotations

import pytest

from conftest import eval_job, job_for, job_parts, local_ray

MEMBERS = {"a": dict(rank=4, lr=3e-3), "b": dict(rank=8, lr=1e-3), "c": dict(rank=8, lr=2e-3)}


@pytest.fixture(scope="module")
def ray_cluster():
    with local_ray("test-farm"):
        yield


@pytest.fixture(scope="module")
def parts(corpus_dir, tmp_path_factory):
    return job_parts(tmp_path_factory.mktemp("farm-runner"), corpus_dir)


def _jobs(parts, suffix: str) -> dict:
    return {name: job_for(parts, f"{name}{suffix}", "lora", steps=12, checkpoint_every=4, seed=i,
                          optimizer={"lr": m["lr"]}, lora={"rank": m["rank"], "alpha": 2 * m["rank"]})
            for i, (name, m) in enumerate(MEMBERS.items())}


def _farm(parts, env: dict | None = None):
    import ray

    from branchout.stages.training.farm_runner import FarmRunner

    options = {"num_cpus": 1, "max_concurrency": len(MEMBERS) + 2, "max_restarts": 0}
    if env:
        options["runtime_env"] = {"env_vars": env}
    return ray.remote(FarmRunner).options(**options).remote(
        "farm-1", str(parts[0] / "base"), str(parts[0] / "tokenizer"), "fp32", False, 1, None)


def _adapter(uri: str) -> dict:
    from safetensors.torch import load_file

    from branchout.storage.checkpoint import fetch_verified

    return load_file(f"{fetch_verified(uri)}/adapter_model.safetensors")


@pytest.fixture(scope="module")
def alone(parts):
    from branchout.stages.training.single_worker import run_single_worker

    jobs = _jobs(parts, "-alone")
    return jobs, {name: run_single_worker(job) for name, job in jobs.items()}


def test_members_end_as_lone_jobs_do_with_their_own_files(ray_cluster, parts, alone):
    import os

    import ray
    import torch

    from branchout.stages.evaluation.evaluate import evaluate_domain

    lone_jobs, lone = alone
    jobs = _jobs(parts, "-farm")
    farm = _farm(parts)
    results = ray.get([farm.train.remote(job) for job in jobs.values()], timeout=600)
    base = str(parts[0] / "base")
    for (name, job), result in zip(jobs.items(), results, strict=True):
        assert result["farm"] == "farm-1" and result["steps"] == 12 and result["first_step"] == 0
        assert result["final_loss"] == pytest.approx(lone[name]["final_loss"], rel=1e-5), name
        mine, theirs = _adapter(job.model_uri), _adapter(lone_jobs[name].model_uri)
        assert sorted(mine) == sorted(theirs)
        for key in theirs:
            torch.testing.assert_close(mine[key], theirs[key], rtol=1e-4, atol=1e-6)
        # the lone layout: step_4 and step_8 with rank 0's manifest (the last step is the export)
        ckpts = sorted(os.listdir(job.checkpoints_uri))
        assert ckpts == ["step_00000004", "step_00000008"], ckpts
        assert os.path.exists(os.path.join(job.checkpoints_uri, "step_00000008", "MANIFEST.rank0.json"))
        scores = evaluate_domain(eval_job(parts, {"farm": (job.model_uri, base),
                                                  "alone": (lone_jobs[name].model_uri, base)}, "fp32"))
        assert f"{scores['farm_ppl']:.4g}" == f"{scores['alone_ppl']:.4g}", (name, scores)
    # three different adapters, not one copied three times
    assert len({round(r["final_loss"], 6) for r in results}) == 3


def test_a_killed_farm_resumes_every_member_alone_from_its_own_checkpoint(ray_cluster, parts, alone):
    import ray
    import torch

    from branchout.stages.training.single_worker import run_single_worker

    lone_jobs, lone = alone
    jobs = _jobs(parts, "-crash")
    # the farm's process SIGKILLs itself once step 6 is logged (last checkpoint: step 4)
    farm = _farm(parts, env={"BRANCHOUT_FAULTS": f"{jobs['b'].name}@6"})
    calls = [farm.train.remote(job) for job in jobs.values()]
    for call in calls:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(call, timeout=600)
    for name, job in jobs.items():
        result = run_single_worker(job)  # the fan-out's retry: alone
        assert result["first_step"] == 4, name  # 2 steps redone, fewer than checkpoint_every
        assert result["final_loss"] == pytest.approx(lone[name]["final_loss"], rel=1e-5), name
        mine, theirs = _adapter(job.model_uri), _adapter(lone_jobs[name].model_uri)
        for key in theirs:
            torch.testing.assert_close(mine[key], theirs[key], rtol=1e-4, atol=1e-6)
