"""Quantization primitives, the quantization state a stage carries, activation fake-quant and code packing."""
