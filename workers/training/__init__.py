"""The training worker: tokenization, the DPO loss, the training loop."""
