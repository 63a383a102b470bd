"""lm-eval task configs (YAML, next to this file) that read local `datasets.save_to_disk` copies, never the HF hub."""
