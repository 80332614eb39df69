"""Static per-tensor int8 activation fake quantization, as forward pre-hooks on Linear layers.

    x_q = clamp(round(x / s), -128, 127) * s,   s = threshold / 127,   zero point 0

This is exactly what an ONNX QuantizeLinear -> DequantizeLinear pair computes (round half to even, saturation to
int8), so the gate measures the behaviour the exported Q/DQ graph has. Layers whose activations fell back keep no
hook (W8A16). The hooks live on one `ActivationQuant` object per model; nothing is global.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dscompress.quant.qstate import QuantState

ATTR = "_dscompress_activation_quant"


def fake_quant_int8(x: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    return (torch.round(x / scale).clamp(-128, 127) * scale).to(x.dtype)


class ActivationQuant:
    """Per-Linear input scales with hooks that can be switched on and off (for sensitivity analysis)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.scales: dict[str, float] = {}
        self.handles: dict[str, torch.utils.hooks.RemovableHandle] = {}

    def set_scale(self, name: str, scale: float) -> None:
        self.scales[name] = float(scale)

    def enable(self, names) -> None:
        for name in names:
            if name in self.handles:
                continue
            scale = self.scales[name]
            module = self.model.get_submodule(name)
            self.handles[name] = module.register_forward_pre_hook(lambda m, args, s=scale: _quant_args(args, s))

    def disable(self, names=None) -> None:
        for name in list(self.handles if names is None else names):
            handle = self.handles.pop(name, None)
            if handle is not None:
                handle.remove()

    @property
    def enabled(self) -> list[str]:
        return sorted(self.handles)


def _quant_args(args: tuple, scale: float) -> tuple:
    return (fake_quant_int8(args[0], scale), *args[1:])


def controller(model: nn.Module) -> ActivationQuant:
    """The model's ActivationQuant, created on first use."""
    aq = getattr(model, ATTR, None)
    if aq is None:
        aq = ActivationQuant(model)
        object.__setattr__(model, ATTR, aq)  # a plain attribute: not a submodule, never saved
    return aq


def detach(model: nn.Module) -> None:
    aq = getattr(model, ATTR, None)
    if aq is not None:
        aq.disable()


def attach(model: nn.Module, state: QuantState | None) -> list[str]:
    """Install the stored int8 activation scales of `state` on `model`; returns the Linear names hooked."""
    detach(model)
    if state is None or not state.activations:
        return []
    aq = controller(model)
    names = [n for n, info in state.activations.items() if info["precision"] == "int8"]
    for name in names:
        aq.set_scale(name, float(state.tensors[f"{name}.input_scale"]))
    aq.enable(names)
    return names


def attach_saved(model: nn.Module, directory: Path) -> list[str]:
    """`attach` from a stage directory's quantization metadata (no-op for weight-only or float stages)."""
    return attach(model, QuantState.load(Path(directory)))
