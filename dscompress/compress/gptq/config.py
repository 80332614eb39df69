"""`gptq:` stage configuration (torch-free: the recipe schema imports it)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from dscompress.compress.activations_config import Activations, activations_field, int8_blocks_problem
from dscompress.compress.rotation_config import rotate_field
from dscompress.compress.selection import WithExclude

HIGH_BITS = 8  # what bits_budget keeps the sensitive weights at


def bits_per_weight(bits: int, group_size: int) -> float:
    """Stored bits per weight: the codes plus a float16 scale and a `bits`-wide zero point per group (per-channel
    grids: about `bits`; quant/qstate.py's quantized_bytes counts the same)."""
    return bits + ((16 + bits) / group_size if group_size > 0 else 0.0)


class GPTQConfig(WithExclude):
    """`gptq:` stage. Example: `{bits: 4, group_size: 64, symmetric: false, act_order: true}`."""

    bits: Literal[2, 3, 4, 8] = Field(4, description="bits per weight")
    group_size: Literal[-1, 32, 64, 128] = Field(128, description="columns per scale; -1 = per output channel")
    symmetric: bool = Field(True, description="symmetric grid (zero point 2**(bits-1)) or asymmetric")
    # On by default: measured on SmolLM2 W4 g64 it cuts KL to fp32 from 0.19 to 0.11 (docs/BENCHMARKS.md), and
    # the checkpoint keeps the plain g_idx, so it costs nothing at inference. true = "static".
    act_order: bool | Literal["static", "group"] = Field(
        True, description="visit columns by decreasing Hessian diagonal: static groups, or group-aware (gptq_math)"
    )
    damp_frac: float = Field(0.01, gt=0, le=1, description="dampening, as a fraction of mean(diag H)")
    block_size: Literal[128, 256] = Field(128, description="columns per lazy batch update")
    kernel: Literal["auto", "torch"] = Field(
        "auto",
        description="auto: on CUDA with Triton, static grids are solved by one fused kernel per 128-column block "
        "(the eager loop launches ~6 kernels per column); torch: always the eager loop",
    )
    clip_search: bool = Field(
        False,
        description="static grids: clip each group's min-max range (a shrink of 1.0 down to 0.6) where the "
        "diag(H)-weighted rounding error is least, instead of the full range",
    )
    awq: bool = Field(
        False,
        description="AWQ scaling before the solve: per activation site whose producer can absorb it (a norm, "
        "up_proj, v_proj), the input channels with the largest mean |x| are scaled up in the weights and down "
        "in the producer, the exponent searched per site on the calibration inputs; the float model is unchanged "
        "and the checkpoint stays stock. One process",
    )
    gptaq: float = Field(
        0.0,
        ge=0,
        le=1,
        description="GPTAQ (asymmetric calibration): fit each weight so the quantized block, on the inputs the "
        "quantized model gives it, reproduces the float block on the float model's inputs, correcting the error "
        "of the blocks before it; the value scales that correction (0: plain GPTQ, 1: the full least-squares "
        "target). MoE expert stacks get plain GPTQ (counted in the report); one process, true_sequential",
    )
    rotate: bool = rotate_field()
    activations: Activations = activations_field()
    bits_budget: float | None = Field(
        None,
        gt=0,
        description="mixed precision: the average bits per quantized weight (group scales and zero points "
        "included) to spend; the weights whose alone-quantized KL to the float model is largest per extra byte "
        "stay at 8 bits until the budget is spent, the rest at `bits`; the choice goes to the report",
    )
    true_sequential: bool = Field(True, description="re-collect inputs after each quantized group of a layer")
    batch_size: int = Field(8, ge=1, description="calibration windows per forward pass")
    moe_min_tokens: int = Field(16, ge=1, description="fewer routed tokens than this: the expert gets RTN")
    devices: int | Literal["auto"] = Field(
        1, description="processes (GPUs) sharing the calibration windows and the solves; auto: every visible GPU"
    )

    @field_validator("devices")
    @classmethod
    def _positive(cls, v):
        if v != "auto" and v < 1:
            raise ValueError("devices must be at least 1 (or auto)")
        return v

    @model_validator(mode="after")
    def _rotate_needs_one_process(self):
        if self.rotate and self.devices != 1:
            raise ValueError(
                f"rotate rewrites the whole model before the solve, and devices: {self.devices} starts workers that "
                "read the layers from the checkpoint on disk; set devices: 1 or rotate: false"
            )
        return self

    @model_validator(mode="after")
    def _awq_fits(self):
        if self.awq and self.devices != 1:
            raise ValueError(f"awq searches each block's scales on all calibration windows in this process, and "
                             f"devices: {self.devices} starts workers; set devices: 1 or awq: false")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _gptaq_fits(self):
        if not self.gptaq:
            return self
        if self.devices != 1:
            raise ValueError(f"gptaq runs a float copy of each block beside the quantized one in this process, and "
                             f"devices: {self.devices} starts workers; set devices: 1 or gptaq: 0")  # fmt: skip
        if not self.true_sequential:
            raise ValueError("gptaq fits each group of weights to the inputs the quantized weights before it give; "
                             "set true_sequential: true or gptaq: 0")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _int8_blocks_fit(self):
        if problem := int8_blocks_problem(self.activations, self.bits, self.group_size):
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _budget_fits(self):
        if self.bits_budget is None:
            return self
        low = bits_per_weight(self.bits, self.group_size)
        if self.bits >= HIGH_BITS:
            raise ValueError(f"bits_budget mixes bits: {self.bits} with {HIGH_BITS}-bit weights; set bits below "
                             f"{HIGH_BITS} or remove bits_budget")  # fmt: skip
        if self.bits_budget < low:
            raise ValueError(
                f"bits_budget {self.bits_budget} is below what {self.bits}-bit weights alone cost at group_size "
                f"{self.group_size} ({low:.3f} bits per weight with their scales and zero points); raise it to at "
                f"least {low:.3f} or remove bits_budget"
            )
        if self.devices != 1:
            raise ValueError(f"bits_budget measures every weight's sensitivity in this process, and devices: "
                             f"{self.devices} starts workers; set devices: 1 or remove bits_budget")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _clip_search_needs_static_grids(self):
        if self.clip_search and self.act_order not in (True, "static") and self.group_size != -1:
            raise ValueError(
                f"clip_search fixes each group's grid before the solve, and act_order {self.act_order!r} takes "
                "grids from the updated weights as the solve goes; set act_order: true (static groups) or remove "
                "clip_search"
            )
        return self
