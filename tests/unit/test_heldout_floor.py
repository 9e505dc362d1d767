"""A dataset whose held-out split is too small to score reliably is flagged (issue 33: the
quickstart's legal domain once kept 3 held-out documents after 26 near-duplicates moved to
training, and nothing said so)."""

from __future__ import annotations

from branchout.core.spec import EvaluateSpec
from branchout.orchestrator.run.driver import small_heldout
from branchout.stages.prepare.data import PackedInfo


def _info(docs: int, blocks: int, moved: int = 0) -> PackedInfo:
    return PackedInfo(uri="x", seq_len=128, dtype="uint16", train_blocks=100, heldout_blocks=blocks, train_docs=90,
                      heldout_docs=docs, heldout_moved_near_duplicates=moved)


def test_a_small_held_out_split_is_flagged_with_why():
    line = small_heldout(_info(3, 2, moved=26), EvaluateSpec())
    assert line == ("only 3 held-out documents (evaluate.min_heldout_docs: 10) and 256 held-out tokens "
                    "(evaluate.min_heldout_tokens: 512); 26 near-duplicates of training text moved to training: its "
                    "perplexity is not reliable (more data, or a larger evaluate.heldout_fraction)")


def test_enough_is_not_flagged_and_the_floors_are_settings():
    assert small_heldout(_info(14, 40), EvaluateSpec()) is None
    assert small_heldout(_info(14, 40), EvaluateSpec(min_heldout_docs=20)).startswith("only 14 held-out documents")
    assert small_heldout(_info(3, 2), EvaluateSpec(min_heldout_docs=0, min_heldout_tokens=0)) is None
