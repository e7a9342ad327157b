"""cai-dpo: Constitutional-AI preference data and DPO training as a service."""
