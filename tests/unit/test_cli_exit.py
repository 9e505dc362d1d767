"""The command's way out: its exit code kept, and the interpreter's last collections skipped."""

from __future__ import annotations

import gc
import sys

import pytest


@pytest.mark.parametrize("argv, code", [(["--version"], 0), (["validate", "/nonexistent/pipeline.yaml"], 2)])
def test_main_keeps_the_exit_code_and_leaves_the_heap_frozen(monkeypatch, argv, code):
    """main() freezes what is alive when the command ends, so the exit's full collections do
    not walk every object torch, transformers and Ray made (1.5 s a command, measured)."""
    from branchout.orchestrator.cli import main

    monkeypatch.setattr(sys, "argv", ["branchout", *argv])
    gc.unfreeze()
    try:
        with pytest.raises(SystemExit) as ended:
            main()
        assert ended.value.code == code
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()  # this test process goes on collecting
