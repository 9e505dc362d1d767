"""branchout: pre-train a causal LM once with DeepSpeed on Ray, fan out per-domain fine-tunes.

Sub-packages:
    cluster       connecting to Ray (embedded or remote) and what the cluster can hold.
    orchestrator  the pipeline spec, the plan, run state, the driver, fan-out and the CLI.
    stages        code that runs on Ray workers: data, tokenizer, pretrain, finetune,
                  evaluate and checkpoint I/O.
"""

__version__ = "0.1.0"
