"""The `activations` field of the weight-only passes (gptq, rtn). Torch-free: the recipe schema imports it.

`int8` declares the arithmetic of ONNX Runtime's MatMulNBits at `accuracy_level` 4 (its int8 path on CPUs):
each block of `group_size` input values along K is quantized to symmetric int8 at run time,

    amax = max |x_b|,   q = rint(x_b * float32(127 / amax)),   x_b ~ q * float32(amax / 127)     (amax 0: q = 0)

and multiplied with the weight codes in integers. The stage itself then computes this (quant/actquant.py), so its
gate measures what the exported graph runs, and the `onnx-ort` export matches it to float rounding instead of
drifting by the int8 rounding (docs/EXPORT.md).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

KERNEL_BITS = (4, 8)  # the widths our MatMulNBits export writes


def activations_field():
    return Field(
        "float",
        description="float: W4A16, activations stay float; int8: activations quantized to int8 per block of "
        "group_size at run time, as ONNX Runtime's MatMulNBits does at accuracy_level 4 (its fast CPU path): the "
        "stage's metrics include it and onnx-ort exports at that level (onnx-ort / ort-genai targets only)",
    )


Activations = Literal["float", "int8"]


def int8_blocks_problem(activations: str, bits: int, group_size: int) -> str | None:
    """Why `activations: int8` does not fit these weights (None: it does)."""
    if activations != "int8":
        return None
    if bits not in KERNEL_BITS:
        return (f"activations: int8 is MatMulNBits' int8 path, for 4- and 8-bit weights, not bits: {bits}; set "
                "bits: 4 or 8, or activations: float")  # fmt: skip
    if group_size == -1:
        return ("activations: int8 quantizes each block of group_size inputs, and group_size: -1 has none that "
                "MatMulNBits takes; set group_size: 32, 64 or 128, or activations: float")  # fmt: skip
    return None


EXPERTS_REFUSAL = (
    "activations: int8 is MatMulNBits' per-Linear int8 path, and MoE expert stacks are not exported as "
    "MatMulNBits; use activations: float, or exclude the experts"
)


def check_activations(config, info) -> list[tuple[str, str]]:
    """`validate`'s rule: no expert stacks among the quantized weights of an `activations: int8` pass."""
    from dscompress.compress.selection import selected

    if config.activations != "int8":
        return []
    experts = [t for t in selected(info.targets, config.exclude) if t.kind != "linear"]
    return [("activations", EXPERTS_REFUSAL)] if experts else []


def declare_int8_blocks(state, config, key: str):
    """Record `activations: int8` in the pass's QuantState (every target quantized per block of group_size at
    run time); refuses expert stacks for Python callers that skip `validate`. Returns `state`."""
    from dscompress.errors import RecipeError

    if config.activations != "int8":
        return state
    if any(meta["kind"] != "linear" for meta in state.targets.values()):
        raise RecipeError(f"{key}.{EXPERTS_REFUSAL}")
    state.set_block_activations()
    return state
