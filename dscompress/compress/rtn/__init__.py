"""dscompress.compress.rtn: one algorithm, its config (config.py, torch-free) and its apply."""
