"""`int8:` stage configuration (torch-free: the recipe schema imports it)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from dscompress.compress.selection import WithExclude


class Int8Config(WithExclude):
    """`int8:` stage. Example: `{calibration: kl, smoothquant_alpha: 0.5, fallback: auto}`."""

    activations: Literal["static", "dynamic"] = Field(
        "static",
        description="static: one calibrated scale per activation tensor (TensorRT; the onnx target); dynamic: a "
        "scale per token computed at run time (ONNX Runtime on CPUs; the onnx-ort target)",
    )
    rotate: bool = Field(
        False,
        description="QuaRot-style rotation first (dense Llama/Qwen2/Qwen3, float32): residual stream and V/O heads "
        "folded into the weights, a block Hadamard around down_proj's input quantizer; the float model's output is "
        "unchanged, its activation outliers are spread (docs/DESIGN.md)",
    )
    online_hadamard: bool = Field(
        True,
        description="with rotate: the block Hadamard around down_proj's input quantizer (two small MatMuls per "
        "layer at run time); false keeps only the offline rotation, free at run time, and quantizes down_proj's "
        "input as it is",
    )
    calibration: Literal["kl", "minmax", "percentile"] = Field(
        "kl", description="activation range observer (static activations only)"
    )
    percentile: float = Field(99.99, gt=50, le=100, description="for calibration: percentile")
    smoothquant_alpha: float | None = Field(
        0.5, ge=0, le=1, description="SmoothQuant migration strength; null turns SmoothQuant off"
    )
    fallback: Literal["auto", "none"] = Field(
        "auto", description="auto: keep the most sensitive activations in 16/32-bit until the stage gate holds"
    )
    fallback_margin: float = Field(0.8, gt=0, le=1, description="share of the gate's slack the estimate may use")
    sensitivity_windows: int = Field(2, ge=1, description="calibration windows that rank the sites' sensitivity")
    fallback_windows: int = Field(8, ge=1, description="calibration windows on which the fallback count is chosen")
    batch_size: int = Field(8, ge=1, description="calibration windows per forward pass")

    # what `plan` and the deployment checks read: int8 weights, per output channel
    bits: ClassVar[int] = 8
    group_size: ClassVar[int] = -1
    symmetric: ClassVar[bool] = True
