"""cai-dpo: the HTTP service, its settings, database models and queries."""
