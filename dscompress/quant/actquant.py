"""Int8 activation fake quantization, as forward pre-hooks on Linear layers.

Static, per tensor (TensorRT, the `onnx` target):

    x_q = clamp(round(x / s), -128, 127) * s,   s = threshold / 127,   zero point 0

This is exactly what an ONNX QuantizeLinear -> DequantizeLinear pair computes (round half to even, saturation to
int8), so the gate measures the behaviour the exported Q/DQ graph has.

Dynamic, per token (ONNX Runtime on CPUs, the `onnx-ort` target), with the scale computed at run time:

    s_t = max(max_j |x_tj| * float32(1/127), 1e-8),   x_q = round(x / s_t) * s_t      (codes in [-127, 127])

in the same float32 operations, in the same order, as the exported graph (export/onnx_quant.py), so both round
alike. Layers whose activations fell back keep no hook (W8A16).

Per block (weight-only stages with `activations: int8`: ONNX Runtime's MatMulNBits at accuracy_level 4 computes it
inside the kernel), for each `block` inputs along K:

    q = rint(x * float32(127 / amax)),   x_q = q * float32(amax / 127),   amax = max |x| over the block (0: q = 0)

bit-exact against the kernel's own quantized inputs (tests/quant/test_actquant_blocks.py). The hooks live on one
`ActivationQuant` object per model; nothing is global.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dscompress.quant.hadamard import rotate
from dscompress.quant.qstate import QuantState

ATTR = "_dscompress_activation_quant"


INV_127 = 1.0 / 127.0  # rounded to float32 where it is used, as the graph's initializer is
SCALE_FLOOR = 1e-8  # an all-zero token keeps a positive scale (its codes are 0 either way)


def fake_quant_int8(x: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    return (torch.round(x / scale).clamp(-128, 127) * scale).to(x.dtype)


def per_token_scale(x: torch.Tensor) -> torch.Tensor:
    """s_t (..., 1) in float32, as the graph computes it: ReduceMax(Abs(x)) * (1/127), at least SCALE_FLOOR."""
    amax = x.float().abs().amax(-1, keepdim=True)
    return (amax * torch.tensor(INV_127, dtype=torch.float32)).clamp_min(SCALE_FLOOR)


def fake_quant_int8_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """MatMulNBits' int8 quantization of its input at accuracy_level 4, per `block` values of the last axis. The
    inverse is a true float32 division 127 / amax (torch's scalar / tensor multiplies by a reciprocal instead,
    which rounds differently)."""
    xb = x.float().reshape(*x.shape[:-1], x.shape[-1] // block, block)
    amax = xb.abs().amax(-1, keepdim=True)
    inverse = torch.where(amax > 0, torch.full_like(amax, 127.0).div(amax), torch.zeros_like(amax))
    return (torch.round(xb * inverse) * (amax / 127)).reshape(x.shape).to(x.dtype)


def fake_quant_int8_per_token(x: torch.Tensor) -> torch.Tensor:
    scale = per_token_scale(x)
    return (torch.round(x.float() / scale) * scale).to(x.dtype)


class ActivationQuant:
    """Per-Linear input scales with hooks that can be switched on and off (for sensitivity analysis)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.scales: dict[str, float | None] = {}  # None: dynamic, per token
        self.blocks: dict[str, int] = {}  # per block of this many inputs (MatMulNBits' int8 path)
        self.rotations: dict[str, tuple[int, int]] = {}  # online block Hadamard around the quantizer (hadamard.py)
        self.handles: dict[str, torch.utils.hooks.RemovableHandle] = {}

    def set_scale(self, name: str, scale: float) -> None:
        self.scales[name] = float(scale)

    def set_dynamic(self, name: str) -> None:
        self.scales[name] = None

    def set_blocks(self, name: str, block: int) -> None:
        self.scales[name], self.blocks[name] = None, int(block)

    def set_rotation(self, name: str, factors) -> None:
        self.rotations[name] = (int(factors[0]), int(factors[1]))

    def enable(self, names) -> None:
        for name in names:
            if name in self.handles:
                continue
            scale, rot, block = self.scales[name], self.rotations.get(name), self.blocks.get(name)
            module = self.model.get_submodule(name)
            self.handles[name] = module.register_forward_pre_hook(
                lambda m, args, s=scale, r=rot, b=block: _quant_args(args, s, r, b)
            )

    def disable(self, names=None) -> None:
        for name in list(self.handles if names is None else names):
            handle = self.handles.pop(name, None)
            if handle is not None:
                handle.remove()

    @property
    def enabled(self) -> list[str]:
        return sorted(self.handles)


def _quant_args(args: tuple, scale: float | None, rotation: tuple[int, int] | None, block: int | None = None) -> tuple:
    """x -> Q(x), or with an online rotation M (M @ M = I): x -> Q(x M) M, so that the stored weight W' = W_q M
    computes W_q Q(x M): the int8 product in the rotated basis."""
    x = args[0] if rotation is None else rotate(args[0], *rotation)
    if block is not None:
        x = fake_quant_int8_blocks(x, block)
    else:
        x = fake_quant_int8_per_token(x) if scale is None else fake_quant_int8(x, scale)
    return (x if rotation is None else rotate(x, *rotation), *args[1:])


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
        if rotation := state.targets.get(name, {}).get("rotation"):
            aq.set_rotation(name, rotation)
        if state.activations[name].get("mode") == "block":
            aq.set_blocks(name, state.activations[name]["block"])
        elif state.activations[name].get("mode") == "dynamic":
            aq.set_dynamic(name)
        else:
            aq.set_scale(name, float(state.tensors[f"{name}.input_scale"]))
    aq.enable(names)
    return names


def attach_saved(model: nn.Module, directory: Path) -> list[str]:
    """`attach` from a stage directory's quantization metadata (no-op for weight-only or float stages)."""
    return attach(model, QuantState.load(Path(directory)))
