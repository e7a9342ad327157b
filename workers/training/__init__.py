"""The training worker: tokenization, the DPO loss, one training loop for one process or a torchrun
group, checkpoints, evaluation (the modules' layers: pyproject.toml's import contracts)."""
