"""Quantization metadata stored next to a stage's checkpoint, so later passes and exporters reuse it exactly.

A quantized stage's `model.safetensors` holds the dequantized float weights (so stock transformers loads it and
evaluation measures the real quantized model). Beside it:
- `quantization.json`: method, bits, group size, symmetry, and every quantized weight with its shape;
- `quantization.safetensors`: `<name>.scale` (float32, (..., G)) and `<name>.zero` (int32, (..., G)).
The integer codes are `round(w / scale) + zero`, exact because w was written as `(q - zero) * scale`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dscompress.quant.hadamard import rotate
from dscompress.quant.primitives import quantize_codes

QUANT_JSON = "quantization.json"
QUANT_TENSORS = "quantization.safetensors"
FORMAT_VERSION = 1


@dataclass
class QuantState:
    method: str
    bits: int
    group_size: int
    symmetric: bool
    targets: dict[str, dict] = field(default_factory=dict)  # name -> {"kind", "shape"}
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # "<name>.scale" / "<name>.zero"
    # W8A8 stages: Linear name -> {"precision": "int8" | "float", "mode": "static" | "dynamic", "site",
    # "threshold", "sensitivity"}; static int8 ones have a "<name>.input_scale" tensor (float32 scalar, symmetric,
    # zero point 0); dynamic ones are quantized per token at run time (quant/actquant.py). Weight-only passes with
    # `activations: int8`: every target {"precision": "int8", "mode": "block", "block": group_size}, MatMulNBits'
    # int8 path (compress/activations_config.py).
    activations: dict[str, dict] = field(default_factory=dict)

    @property
    def dynamic_activations(self) -> bool:
        return any(a.get("mode") == "dynamic" and a["precision"] == "int8" for a in self.activations.values())

    @property
    def block_activations(self) -> bool:
        return any(a.get("mode") == "block" for a in self.activations.values())

    def set_block_activations(self) -> None:
        """Every target's input quantized to int8 per block of group_size at run time (MatMulNBits at
        accuracy_level 4)."""
        for name in self.targets:
            self.activations[name] = {"precision": "int8", "mode": "block", "block": self.group_size}

    @property
    def mixed(self) -> bool:
        """Some targets carry their own bits (gptq's bits_budget: the sensitive ones at 8)."""
        return any(meta.get("bits", self.bits) != self.bits for meta in self.targets.values())

    def bits_of(self, name: str) -> int:
        return self.targets[name].get("bits", self.bits)

    def add(self, name: str, kind: str, shape, scale: torch.Tensor, zero: torch.Tensor,
            bits: int | None = None) -> None:  # fmt: skip
        self.targets[name] = {"kind": kind, "shape": list(shape)}
        if bits is not None and bits != self.bits:
            self.targets[name]["bits"] = bits
        self.tensors[f"{name}.scale"] = scale.float().contiguous()
        self.tensors[f"{name}.zero"] = zero.to(torch.int32).contiguous()

    def codes(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The integer codes of a stored (dequantized) weight; a weight stored rotated back from an online
        rotation's basis (targets[name]["rotation"], quant/hadamard.py) is rotated into it first."""
        if rotation := self.targets[name].get("rotation"):
            weight = rotate(weight.float(), *rotation)
        scale, zero = self.tensors[f"{name}.scale"], self.tensors[f"{name}.zero"]
        return quantize_codes(weight, scale, zero, self.bits_of(name), self.group_size)

    def save(self, directory: Path) -> None:
        meta = {
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "convention": "w = (q - zero) * scale, q unsigned in [0, 2**bits - 1], groups along in_features; a "
            "target's own `bits` overrides the stage's",
            "targets": self.targets,
        }
        if self.activations:
            meta["activations"] = self.activations
            meta["activation_convention"] = (
                "static: x_q = clamp(round(x / input_scale), -128, 127), zero point 0; dynamic: per token, "
                "s = max(max|x| * float32(1/127), 1e-8), x_q = round(x / s); block: per `block` inputs along K, "
                "q = rint(x * float32(127 / max|x|)) (0 where max|x| is 0), x_q = q * float32(max|x| / 127)"
            )
        (directory / QUANT_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        save_file(self.tensors, str(directory / QUANT_TENSORS), metadata={"format": "dscompress-qstate"})

    @classmethod
    def load(cls, directory: Path) -> QuantState | None:
        if not (directory / QUANT_JSON).is_file():
            return None
        meta = json.loads((directory / QUANT_JSON).read_text())
        tensors = load_file(str(directory / QUANT_TENSORS))
        return cls(
            meta["method"], meta["bits"], meta["group_size"], meta["symmetric"], meta["targets"], tensors,
            meta.get("activations", {}),
        )  # fmt: skip


def quantized_bytes(n_params: int, bits: int, group_size: int, in_features: int) -> float:
    """Deployed bytes of n_params quantized weights: codes plus a fp16 scale and a zero per group."""
    group = in_features if group_size == -1 else group_size
    return n_params * bits / 8 + n_params / group * (2 + bits / 8)


def deployed_bytes(model, state: QuantState | None) -> int:
    """The bytes a runtime loads for `model`: quantized weights at their bits with their scales and zeros,
    every other parameter (tied ones once) at its own dtype. Disk use of a stage folder is something else (it
    keeps float weights beside the grid)."""
    params = {(p.data_ptr() if not p.is_meta else id(p)): p for p in model.parameters()}.values()
    total = sum(p.numel() * p.element_size() for p in params)
    if state is None:
        return int(total)
    element = next(iter(params)).element_size()
    for meta in state.targets.values():
        numel = math.prod(meta["shape"])
        bits = meta.get("bits", state.bits)
        total += quantized_bytes(numel, bits, state.group_size, meta["shape"][-1]) - numel * element
    return int(total)
