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


EXPORT = """
import json, sys
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from tokenizers import Tokenizer, models
from branchout.stages.training.model import export_model
if sys.argv[2] == "trained-with-deepspeed":
    from branchout.stages.training.ds_files import import_deepspeed
    import_deepspeed()
config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")))
export_model(LlamaForCausalLM(config), tokenizer, sys.argv[1])
reloaded = LlamaForCausalLM.from_pretrained(sys.argv[1])
print(json.dumps({"deepspeed": "deepspeed" in sys.modules, "mlflow": "mlflow" in sys.modules,
                  "hidden": reloaded.config.hidden_size}))
"""


def test_an_export_without_deepspeed_training_imports_neither_deepspeed_nor_mlflow(tmp_path):
    """A warm runner's fine-tune exports through ``save_pretrained``, which (through accelerate)
    imported DeepSpeed and its MLflow only to ask whether the model is a DeepSpeed engine:
    ~100 MiB and seconds of imports in every runner. Now only a process that trained with
    DeepSpeed has it, and its export is as before; both exports load."""
    import json

    seen = {}
    for case in ("plain", "trained-with-deepspeed"):
        out = subprocess.run([sys.executable, "-c", EXPORT, str(tmp_path / case), case], capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        seen[case] = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["plain"] == {"deepspeed": False, "mlflow": False, "hidden": 16}
    assert seen["trained-with-deepspeed"] == {"deepspeed": True, "mlflow": False, "hidden": 16}
