"""What makes a restart resume where it should, without Ray: the order of checkpoint and log,
attempt leases against orphaned workers, resume points kept for the driver, injected faults."""

from __future__ import annotations

import copy

import pytest

from branchout import storage
from branchout.stages.job import LeaseLostError

from conftest import job_for, job_parts


@pytest.fixture(scope="module")
def parts(corpus_dir, tmp_path_factory):
    return job_parts(tmp_path_factory.mktemp("recovery"), corpus_dir)


def test_a_superseded_attempt_writes_nothing(parts):
    from branchout.stages.training.single_worker import run_single_worker

    orphan = job_for(parts, "superseded", "full", steps=8, checkpoint_every=2)
    orphan.claim()
    newer = copy.deepcopy(orphan)
    newer.claim()  # a resumed driver's attempt takes the job over
    with pytest.raises(LeaseLostError, match="a newer attempt owns"):
        orphan.check_lease()
    newer.check_lease()
    with pytest.raises(LeaseLostError):
        run_single_worker(orphan)
    assert storage.listdir(orphan.checkpoints_uri) == [] and not storage.exists(orphan.model_uri)


def test_a_finished_orphan_leaves_the_resumed_attempt_its_checkpoints(parts):
    """A worker that outlives its driver may finish the job; the driver never recorded that,
    so a resumed attempt runs the job again and must resume from the newest checkpoint."""
    from branchout.stages.training.single_worker import run_single_worker

    job = job_for(parts, "orphan", "full", steps=8, checkpoint_every=3)
    job.claim()
    assert run_single_worker(job)["first_step"] == 0
    assert storage.listdir(job.checkpoints_uri) == ["step_00000003", "step_00000006"]
    job.claim()
    assert run_single_worker(job)["first_step"] == 6
