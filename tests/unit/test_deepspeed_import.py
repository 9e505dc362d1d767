"""DeepSpeed is imported without the MLflow import its autotuner makes (1.1 s of every training
process's start); MLflow stays importable afterwards for branchout's own tracking."""

from __future__ import annotations

import subprocess
import sys


def test_deepspeed_loads_without_mlflow_and_mlflow_still_loads_after():
    script = ("import sys; from branchout.stages.training.ds_files import import_deepspeed; import_deepspeed(); "
              "from deepspeed.autotuning import autotuner; print('mlflow' in sys.modules, autotuner.has_mlflow); "
              "import mlflow; print(mlflow.start_run is not None)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-3:] == ["False", "False", "True"], out.stdout
