"""A finished adapter farm gives its worker's bundle back: three farms on a 2-CPU local Ray,
each runner asking for one CPU, all finish (before the fix two finished farms held both CPUs
and the third waited for ever: the 64-domain benchmark hung at 32 of 64 fine-tunes)."""

from __future__ import annotations

import time

import pytest

from conftest import job_for, job_parts, local_ray


@pytest.fixture(scope="module")
def parts(corpus_dir, tmp_path_factory):
    return job_parts(tmp_path_factory.mktemp("farm-release"), corpus_dir)


def test_three_farms_on_two_cpus_all_finish(parts):
    from branchout.orchestrator.run.pool import FarmSet

    root = parts[0]
    with local_ray("farm-release") as ray:
        farms = FarmSet(str(root / "base"), str(root / "tokenizer"))
        try:
            futures = [farms.submit(job_for(parts, f"farm{i}", "lora", steps=3), f"farm-{i}", {"CPU": 1.0}, 1)
                       for i in range(3)]
            results = [f.result(timeout=240) for f in futures]
            assert [r["steps"] for r in results] == [3, 3, 3]
            # the third farm could only start once a finished one let go; the last lets go just after
            # its result (a thread of its own): wait for that, not a fixed time
            deadline = time.time() + 60
            while ray.available_resources().get("CPU", 0) < 2 and time.time() < deadline:
                time.sleep(0.1)
            assert ray.available_resources().get("CPU", 0) == pytest.approx(2.0)  # every runner is gone
        finally:
            farms.shutdown()
