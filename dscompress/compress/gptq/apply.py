"""`gptq` pass entry: pre-flight check, and the choice between one process (solve.py) and one worker per device
(dist.py)."""

from __future__ import annotations

import torch

from dscompress.compress import cluster
from dscompress.compress.activations_config import check_activations, declare_int8_blocks
from dscompress.compress.gptq import dist
from dscompress.compress.gptq.budget import allocate
from dscompress.compress.gptq.config import GPTQConfig
from dscompress.compress.gptq.ranks import SingleRank
from dscompress.compress.gptq.solve import quantize
from dscompress.compress.rotation import check_rotate, rotate_first
from dscompress.compress.selection import check_group_size
from dscompress.compress.workers import world_size
from dscompress.context import PassOutput, StageContext
from dscompress.errors import RecipeError
from dscompress.models.stream import stream_of


def check(config: GPTQConfig, info) -> list[tuple[str, str]]:
    """The same pre-flight rules as rtn: the group size divides every quantized width; rotation fits the model;
    int8 activations have no expert stacks to quantize."""
    return check_group_size(config, info) + check_rotate(config, info) + check_activations(config, info)


def apply(model: torch.nn.Module, config: GPTQConfig, ctx: StageContext) -> PassOutput:
    out = _apply(model, config, ctx)
    declare_int8_blocks(out.quant, config, "gptq")
    return out


def _apply(model: torch.nn.Module, config: GPTQConfig, ctx: StageContext) -> PassOutput:
    if cluster.launched():  # started by torchrun: every rank of the launcher's group takes part; `devices` unused
        if config.bits_budget is not None:
            raise RecipeError("gptq.bits_budget: under torchrun every rank reads its layers from the checkpoint on "
                              "disk; run it as one process or remove bits_budget")  # fmt: skip
        if config.awq or config.gptaq:
            field = "awq" if config.awq else "gptaq"
            raise RecipeError(
                f"gptq.{field}: under torchrun each rank sees its share of the windows only, and {field} needs "
                "all of them in one process; run it as one process or turn it off"
            )
        if config.rotate:
            raise RecipeError(
                "gptq.rotate: under torchrun every rank reads its layers from the checkpoint on disk, which the "
                "rotation would not reach; run it as one process or set rotate: false"
            )
        return dist.lead(model, config, ctx)
    world = world_size(config.devices, ctx.device, "gptq")
    windows = len(ctx.calibration())
    if world > windows:
        raise RecipeError(f"gptq.devices: {world} devices but {windows} calibration windows; each device needs "
                          "at least one. Fix: lower devices or raise data.calibration.samples")  # fmt: skip
    if world > 1:  # one worker process per device; they write the result this process loads
        return dist.launch(model, config, ctx, world)
    if config.rotate and stream_of(model) is not None:
        raise RecipeError(
            "gptq.rotate: the model is streamed (model.stream: true), one layer in memory at a time, and the "
            "rotation rewrites all of them first; remove model.stream or set rotate: false"
        )
    if config.bits_budget is not None and stream_of(model) is not None:
        raise RecipeError(
            "gptq.bits_budget: the model is streamed (model.stream: true), and the sensitivity of each weight is "
            "measured on the whole model; remove model.stream or bits_budget"
        )
    rotation = rotate_first(model, ctx, config, "gptq")
    high, mixed = allocate(model, config, ctx) if config.bits_budget is not None else ({}, None)
    out = quantize(model, config, ctx, SingleRank(), high)
    if rotation:
        out.summary["rotation"] = rotation
    if mixed:
        out.summary["mixed_precision"] = mixed
    return out
