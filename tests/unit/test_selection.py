"""What a fine-tune does with its held-out scores (``keep_best``, ``early_stop``), and how
that survives a restart."""

from __future__ import annotations

import math

from branchout.core.spec import FinetuneOptions
from branchout.stages.training.validation import Selection


def test_the_best_and_the_patience_follow_the_scores():
    s = Selection.of(FinetuneOptions(eval_every=5, early_stop={"patience": 2, "min_delta": 0.01}))
    assert (s.keep_best, s.patience, s.min_delta) == (True, 2, 0.01)
    assert s.observe(5, 3.0) and (s.best_step, s.since_best) == (5, 0)
    assert not s.observe(10, 2.995)  # better, but not by more than min_delta
    assert not s.should_stop
    assert not s.observe(15, math.nan)  # a NaN score is never a best
    assert s.should_stop and s.best_step == 5


def test_a_restart_decides_as_the_uninterrupted_run():
    scores = [(5, 3.0), (10, 2.5), (15, 2.7), (20, 2.6), (25, 2.8)]
    whole = Selection(patience=3)
    for step, loss in scores:
        whole.observe(step, loss)
    resumed = Selection(patience=3)
    for step, loss in scores[:3]:
        resumed.observe(step, loss)
    saved = resumed.state()  # what the step-15 checkpoint carries
    assert set(saved) == {"best_step", "best_loss", "since_best"}
    after = Selection(patience=3)
    after.load(saved)
    for step, loss in scores[3:]:
        after.observe(step, loss)
    assert after.state() == whole.state() and after.should_stop and whole.should_stop
    assert after.outputs()["best_step"] == 10
