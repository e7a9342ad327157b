"""The workers: generation (vLLM critique-and-revise), scoring and DPO training."""
