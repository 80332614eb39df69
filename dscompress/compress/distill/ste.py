"""Quantized students stay quantized: fake quantization on the stored grid with a straight-through estimator.

Each quantized weight gets a parametrization `w -> w + (dequant(quant(w)) - w).detach()` that uses the stage's
own scales and zero points (quantization.safetensors). The forward pass sees exactly the stored grid, gradients
reach the latent float weights unchanged (STE). Removing the parametrizations snaps every weight onto the grid,
so the trained artifact has the same scales, zero points and codes layout as its input.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from dscompress.quant.primitives import fake_quantize, max_code
from dscompress.quant.qstate import QuantState


class GridFakeQuant(nn.Module):
    def __init__(self, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int):
        super().__init__()
        self.register_buffer("scale", scale.float(), persistent=False)
        self.register_buffer("zero", zero.float(), persistent=False)
        self.top, self.group_size = max_code(bits), group_size

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        groups = self.scale.shape[-1]
        wg = w.reshape(*w.shape[:-1], groups, -1)
        q = (torch.round(wg / self.scale.unsqueeze(-1)) + self.zero.unsqueeze(-1)).clamp(0, self.top)
        dq = ((q - self.zero.unsqueeze(-1)) * self.scale.unsqueeze(-1)).reshape(w.shape).to(w.dtype)
        return w + (dq - w).detach()


def _owner(model: nn.Module, name: str, kind: str) -> tuple[nn.Module, str]:
    if kind == "experts":
        parent, _, attr = name.rpartition(".")
        return model.get_submodule(parent), attr
    return model.get_submodule(name), "weight"


def attach_grid(model: nn.Module, quant: QuantState) -> list[tuple[nn.Module, str]]:
    """Parametrize every quantized weight of `model` with its stored grid; returns what was parametrized."""
    owners = []
    for name, target in quant.targets.items():
        module, attr = _owner(model, name, target["kind"])
        scale, zero = quant.tensors[f"{name}.scale"], quant.tensors[f"{name}.zero"]
        fake = GridFakeQuant(scale, zero, quant.bits_of(name), quant.group_size).to(getattr(module, attr).device)
        parametrize.register_parametrization(module, attr, fake, unsafe=True)
        owners.append((module, attr))
    return owners


def parametrized(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """Every (module, attribute) of `model` under a parametrization (attach_grid's, after a DDP load)."""
    return [(m, attr) for m in model.modules() if parametrize.is_parametrized(m) for attr in m.parametrizations]


def snap_to_grid(owners: list[tuple[nn.Module, str]]) -> None:
    """Remove the parametrizations, leaving each weight exactly on its grid."""
    for module, attr in owners:
        parametrize.remove_parametrizations(module, attr, leave_parametrized=True)


def off_grid(model: nn.Module, quant: QuantState) -> list[str]:
    """Names of quantized weights that do not lie exactly on their stored grid (empty when all do)."""
    bad = []
    for name, target in quant.targets.items():
        module, attr = _owner(model, name, target["kind"])
        w = getattr(module, attr).detach().float().cpu()
        fake = GridFakeQuant(quant.tensors[f"{name}.scale"], quant.tensors[f"{name}.zero"], quant.bits_of(name),
                             quant.group_size)  # fmt: skip
        if not torch.equal(fake(w), w):
            bad.append(name)
    return bad


def requantize(model: nn.Module, quant: QuantState) -> QuantState:
    """Round-to-nearest again after float training: new scales with each weight's bits and the stage's group size
    and symmetry."""
    fresh = QuantState(f"{quant.method}+requantized", quant.bits, quant.group_size, quant.symmetric)
    with torch.no_grad():
        for name, target in quant.targets.items():
            module, attr = _owner(model, name, target["kind"])
            weight = getattr(module, attr)
            bits = quant.bits_of(name)
            dq, scale, zero = fake_quantize(weight.float(), bits, quant.group_size, quant.symmetric)
            weight.copy_(dq.to(weight.dtype))
            fresh.add(name, target["kind"], weight.shape, scale, zero, bits)
    return fresh
