"""Weight-only round-to-nearest quantization (INT8 / INT4 / ...), group-wise, symmetric or asymmetric.

The artifact keeps dequantized float weights, so stock transformers loads it and the gate measures the real
quantized model; scales and zero points go to quantization.safetensors for exporters.
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from dscompress.compress.quant import fake_quantize
from dscompress.context import PassOutput, StageContext
from dscompress.export.qstate import QuantState
from dscompress.models.adapters import WeightTarget

DEFAULT_EXCLUDE = [r"(^|\.)lm_head$", r"embed_tokens"]


class WithExclude(BaseModel):
    """The `exclude` field every quantizing pass shares: regexes (re.search) on module paths left in float."""

    model_config = ConfigDict(extra="forbid")

    exclude: list[str] = Field(
        default_factory=lambda: list(DEFAULT_EXCLUDE),
        description="regexes (re.search) on module paths left in float; default: embeddings and lm_head",
    )

    @field_validator("exclude")
    @classmethod
    def _regexes_compile(cls, value: list[str]) -> list[str]:
        return check_regexes(value)


class RTNConfig(WithExclude):
    """`rtn:` stage. Example: `{bits: 4, group_size: 64, symmetric: false}`."""

    bits: Literal[2, 3, 4, 8] = Field(4, description="bits per weight")
    group_size: Literal[-1, 32, 64, 128] = Field(
        128, description="weights sharing one scale along in_features; -1 = one per output channel"
    )
    symmetric: bool = Field(True, description="symmetric grid (zero point 2**(bits-1)) or asymmetric")


def check_regexes(value: list[str]) -> list[str]:
    """Every pattern compiles; otherwise a ValueError (a one-line recipe error) naming it."""
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"invalid regex {pattern!r}: {exc}") from exc
    return value


def selected(targets: list[WeightTarget], exclude: list[str]) -> list[WeightTarget]:
    patterns = [re.compile(p) for p in exclude]
    return [t for t in targets if not any(p.search(t.name) for p in patterns)]


def check(config: RTNConfig, info) -> list[tuple[str, str]]:
    """Model-dependent problems as (field, message); used by `validate` before any compute."""
    targets = info.targets
    if config.group_size == -1:
        return []
    widths = sorted({t.in_features for t in selected(targets, config.exclude)})
    bad = [w for w in widths if w % config.group_size]
    if not bad:
        return []
    fits = [g for g in (32, 64, 128) if all(w % g == 0 for w in widths)] + [-1]
    first = next(t for t in targets if t.in_features == bad[0])
    return [(
        "group_size",
        f"{config.group_size} does not divide in_features {bad[0]} of {first.name}; "
        f"use one of {', '.join(map(str, fits))}",
    )]  # fmt: skip


def apply(model: torch.nn.Module, config: RTNConfig, ctx: StageContext) -> PassOutput:
    state = QuantState("rtn", config.bits, config.group_size, config.symmetric)
    targets = selected(list(ctx.adapter.weight_targets(model)), config.exclude)
    with torch.no_grad():
        for t in ctx.track(targets, f"rtn int{config.bits} g{config.group_size}"):
            weight = t.param
            deq, scale, zero = fake_quantize(weight, config.bits, config.group_size, config.symmetric)
            weight.copy_(deq.to(weight.dtype))
            state.add(t.name, t.kind, weight.shape, scale, zero)
    numel = sum(t.param.numel() for t in targets)
    return PassOutput(model, quant=state, summary={"quantized_weights": len(targets), "quantized_params": numel})
