"""`gptq` pass entry: pre-flight check, and the choice between one process (solve.py) and one worker per device
(dist.py)."""

from __future__ import annotations

import torch

from dscompress.compress import cluster
from dscompress.compress.gptq import dist
from dscompress.compress.gptq.config import GPTQConfig
from dscompress.compress.gptq.ranks import SingleRank
from dscompress.compress.gptq.solve import quantize
from dscompress.compress.selection import check_group_size
from dscompress.compress.workers import world_size
from dscompress.context import PassOutput, StageContext
from dscompress.errors import RecipeError

# The same pre-flight rule as rtn: the group size must divide every quantized width.
check = check_group_size


def apply(model: torch.nn.Module, config: GPTQConfig, ctx: StageContext) -> PassOutput:
    if cluster.launched():  # started by torchrun: every rank of the launcher's group takes part; `devices` unused
        return dist.lead(model, config, ctx)
    world = world_size(config.devices, ctx.device, "gptq")
    windows = len(ctx.calibration())
    if world > windows:
        raise RecipeError(f"gptq.devices: {world} devices but {windows} calibration windows; each device needs "
                          "at least one. Fix: lower devices or raise data.calibration.samples")  # fmt: skip
    if world > 1:  # one worker process per device; they write the result this process loads
        return dist.launch(model, config, ctx, world)
    return quantize(model, config, ctx, SingleRank())
