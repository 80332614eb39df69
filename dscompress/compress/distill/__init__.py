"""dscompress.compress.distill: one algorithm, its config (config.py, torch-free) and its apply."""
