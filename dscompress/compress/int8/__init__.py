"""dscompress.compress.int8: one algorithm, its config (config.py, torch-free) and its apply."""
