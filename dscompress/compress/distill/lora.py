"""LoRA recovery inside the distill pass (`distill: {lora: {...}}`), through peft, the well-kept library.

peft's LoRA Linear layer wraps each targeted Linear with a low-rank adapter (`y = W x + (alpha / r) B A x`, B
starting at zero, so training starts from the student itself); everything else is frozen: gradients and AdamW
moments exist for the adapters only, about 2 r (in + out) values per Linear instead of in x out. At the end every
adapter is merged into its weight and the peft layers are removed, so the stage is a stock checkpoint again.

Quantized students (an rtn/gptq stage as input), `quantized:`
- `ste`: the adapters are trained through the stage's grid. The base weight W0 (already on the grid) is
  parametrized to `Q(W0 + D) - D` with no gradient, D = (alpha / r) B A, so the layer computes exactly
  `Q(W0 + D) x`, what the merged and snapped weight will compute, and the adapters get the straight-through
  gradient of that quantized weight. The end merges D and snaps onto the stored grid: same scales, zero points and
  metadata as the input, new codes where the adapters moved a weight across a rounding boundary.
- `requantize`: the adapters are trained in float over the frozen grid weights (QLoRA-style); the merged
  weights are re-quantized by round-to-nearest with the stage's bits, group size and symmetry (new scales).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from dscompress.compress.distill.config import LoraSettings
from dscompress.compress.distill.ste import GridFakeQuant
from dscompress.errors import RecipeError
from dscompress.quant.qstate import QuantState

ADAPTER = "default"


class ThroughGrid(nn.Module):
    """W0 -> Q(W0 + D) - D without gradient, D the adapter's current delta: the adapted Linear then computes
    Q(W0 + D) x, and the adapter path carries the straight-through gradient."""

    def __init__(self, fake: GridFakeQuant, delta: Callable[[], torch.Tensor]):
        super().__init__()
        self.fake = fake
        self._delta = delta  # a function, not a submodule: the adapter belongs to the layer that owns this

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            d = self._delta().float()
            return (self.fake(w.float() + d) - d).to(w.dtype)


@dataclass
class Adapters:
    names: list[str]  # adapted Linear modules
    through_grid: list[str]  # those whose base weight is quantized and trained through its grid (ste)
    trainable_params: int
    frozen_params: int

    def summary(self, settings: LoraSettings, merged: str) -> dict:
        return {"rank": settings.rank, "alpha": settings.alpha, "dropout": settings.dropout,
                "adapted_linears": len(self.names), "through_grid": len(self.through_grid),
                "trainable_params": self.trainable_params, "frozen_params": self.frozen_params,
                "merged": merged}  # fmt: skip


def attach(model: nn.Module, settings: LoraSettings, seed: int, grid: QuantState | None = None) -> Adapters:
    """Wrap the targeted Linears of `model` in place (seeded, so every rank and every resume starts alike); with
    `grid`, the adapted quantized weights are trained through it (module docstring). peft's layer class is used
    directly, not its model-level injection: for transformers 5 MoE models that remaps MLP names onto the stacked
    experts' parameters, which this pass leaves frozen."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout)
    model.requires_grad_(False)  # the adapters created below are the only trainable parameters
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in linear_targets(model, settings.targets):
            parent, _, attr = name.rpartition(".")
            owner = model.get_submodule(parent)
            layer = LoraLinear(getattr(owner, attr), ADAPTER, config, r=settings.rank, lora_alpha=settings.alpha,
                               lora_dropout=settings.dropout)  # fmt: skip
            layer.lora_A[ADAPTER].float()  # float32 adapters over bf16/fp16 weights, as peft's autocast does
            layer.lora_B[ADAPTER].float()
            setattr(owner, attr, layer)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    on_grid = []
    for name, layer in layers.items():
        target = grid.targets.get(name) if grid is not None else None
        if target is None or target["kind"] != "linear":
            continue
        base = layer.get_base_layer()
        scale, zero = grid.tensors[f"{name}.scale"], grid.tensors[f"{name}.zero"]
        fake = GridFakeQuant(scale, zero, grid.bits_of(name), grid.group_size).to(base.weight.device)
        parametrize.register_parametrization(base, "weight", ThroughGrid(fake, _delta_of(layer)), unsafe=True)
        on_grid.append(name)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return Adapters(sorted(layers), on_grid, trainable, frozen)


def linear_targets(model: nn.Module, targets: list[str] | str) -> list[str]:
    """Full names of the nn.Linear modules to adapt: every one but the output head (all-linear), or those whose last
    name is listed. Stacked experts are parameters of one module, not Linears, and stay frozen."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}
    names = [n for n in linears if targets == "all-linear" or n.rsplit(".", 1)[-1] in targets]
    if not names:
        found = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise RecipeError(f"distill.lora.targets: {targets} name no Linear of this model; allowed: all-linear or "
                          f"some of {', '.join(found)}")  # fmt: skip
    return names


def _delta_of(layer) -> Callable[[], torch.Tensor]:
    return lambda: layer.get_delta_weight(ADAPTER)


def merge(model: nn.Module) -> int:
    """Fold every adapter into its base weight (dropping any grid parametrization first) and put the plain
    Linear back in its place; the model is a stock transformers model again. Returns the number merged."""
    from peft.tuners.lora import LoraLayer

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    with torch.no_grad():
        for name, layer in layers:
            delta = layer.get_delta_weight(ADAPTER).float()
            base = layer.get_base_layer()
            if parametrize.is_parametrized(base, "weight"):
                parametrize.remove_parametrizations(base, "weight", leave_parametrized=False)
            base.weight.copy_((base.weight.float() + delta.to(base.weight.device)).to(base.weight.dtype))
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, base)
    model.requires_grad_(True)
    return len(layers)


def finish(model: nn.Module, adapters: Adapters | None, settings: LoraSettings | None) -> dict | None:
    """After training: the adapters merged into `model`; their summary (None without LoRA)."""
    if adapters is None:
        return None
    merge(model)
    return adapters.summary(settings, "")
