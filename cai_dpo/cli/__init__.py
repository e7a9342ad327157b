"""The `cai-dpo` command: the process supervisor, the client commands and their parser."""
