"""Workers: generation (vLLM critique-and-revise) and training (DPO), each a package."""
