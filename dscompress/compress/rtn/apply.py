"""Weight-only round-to-nearest quantization (INT8 / INT4 / ...), group-wise, symmetric or asymmetric.

The artifact keeps dequantized float weights, so stock transformers loads it and the gate measures the real
quantized model; scales and zero points go to quantization.safetensors for exporters.
"""

from __future__ import annotations

import torch

from dscompress.compress.activations_config import check_activations, declare_int8_blocks
from dscompress.compress.rotation import check_rotate, rotate_first
from dscompress.compress.rtn.config import RTNConfig
from dscompress.compress.selection import check_group_size, selected
from dscompress.context import PassOutput, StageContext
from dscompress.quant.primitives import fake_quantize
from dscompress.quant.qstate import QuantState


def check(config: RTNConfig, info) -> list[tuple[str, str]]:
    """The pre-flight rules: the group size divides every quantized width; rotation fits the architecture; int8
    activations have no expert stacks to quantize."""
    return check_group_size(config, info) + check_rotate(config, info) + check_activations(config, info)


def apply(model: torch.nn.Module, config: RTNConfig, ctx: StageContext) -> PassOutput:
    rotation = rotate_first(model, ctx, config, "rtn")
    state = QuantState("rtn", config.bits, config.group_size, config.symmetric)
    targets = selected(list(ctx.adapter.weight_targets(model)), config.exclude)
    with torch.no_grad():
        for t in ctx.track(targets, f"rtn int{config.bits} g{config.group_size}"):
            weight = t.param
            deq, scale, zero = fake_quantize(weight, config.bits, config.group_size, config.symmetric)
            weight.copy_(deq.to(weight.dtype))
            state.add(t.name, t.kind, weight.shape, scale, zero)
    declare_int8_blocks(state, config, "rtn")
    numel = sum(t.param.numel() for t in targets)
    summary = {"quantized_weights": len(targets), "quantized_params": numel}
    return PassOutput(model, quant=state, summary=summary | ({"rotation": rotation} if rotation else {}))
