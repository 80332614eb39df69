"""dscompress.compress.gptq: one algorithm, its config (config.py, torch-free) and its apply."""
