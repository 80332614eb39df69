"""The `rotate` field of the weight-only passes (gptq, rtn). Torch-free: the recipe schema imports it."""

from __future__ import annotations

from pydantic import Field


def rotate_field():
    """QuaRot's offline rotation before a weight-only pass (compress/rotation.py steps 1-3, no online Hadamard):
    the result is a stock checkpoint whose Linears have no outlier input channels left to spread."""
    return Field(
        False,
        description="QuaRot-style offline rotation first (dense Llama/Qwen2/Qwen3): RMSNorm scales folded, the "
        "residual stream and V/O heads rotated into the weights; the float model is unchanged and the checkpoint "
        "stays stock, but tied embeddings are untied (one more vocab x hidden matrix). One process, no "
        "model.stream (docs/BENCHMARKS.md: measured against the unrotated pass)",
    )
