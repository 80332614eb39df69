"""Activation sites (Linear layers that read the same tensor) and per-channel scales folded into the graph: SmoothQuant
(the int8 pass) and AWQ (the gptq pass, compress/gptq/awq.py) both divide a site's tensor by s and multiply its readers.

A site is one activation tensor with one static int8 scale, read by one or more Linear layers (q/k/v read the
same normed hidden state). SmoothQuant (arXiv 2211.10438) divides channel j of that tensor by
    s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha)     (W_j: column j of every Linear at the site)
and multiplies the readers' weight columns by s_j. The division is folded into what produces the tensor, so the
smoothed model is a stock checkpoint with the same float output:
- `NormFold`: the preceding RMSNorm's weight (input_layernorm -> q/k/v, post_attention_layernorm -> gate/up,
  DeepSeek's q_a_layernorm -> q_b_proj and kv_a_layernorm -> kv_b_proj);
- `RowsFold`: the rows of the producing projection, where the path between is linear per channel: v_proj -> o_proj
  (attention mixes positions, never channels; with grouped-query attention every query head of a KV group shares
  the group's scale) and up_proj -> down_proj (act(gate) * up is linear in up).
Sites whose tensor has other readers are not smoothed: in MoE layers the post-attention norm also feeds the router
and the routed experts, and DeepSeek's o_proj reads values decompressed inside kv_b_proj together with keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dscompress.models.adapters import ArchAdapter, WeightTarget


@dataclass
class NormFold:
    norm: nn.Module  # RMSNorm with a `weight` of the site's width


@dataclass
class RowsFold:
    producer: nn.Linear
    index: torch.Tensor  # (site width,) long: producer row feeding each site channel


@dataclass
class Site:
    name: str  # "<layer prefix>.<first linear's relative path>" e.g. model.layers.3.self_attn.q_proj
    layer: int
    linears: list[WeightTarget]
    fold: NormFold | RowsFold | None

    @property
    def width(self) -> int:
        return self.linears[0].in_features


def layer_sites(adapter: ArchAdapter, model: nn.Module, index: int) -> list[Site]:
    """The activation sites of decoder layer `index`, in execution order. Routed experts are not sites."""
    layer = adapter.layers(model)[index]
    prefix = f"{adapter.layers_path}.{index}."
    moe = adapter.is_moe_layer(model.config, index)
    sites = []
    for group in adapter.block_linears(model, index):
        if group[0].kind != "linear":
            continue
        first = group[0].name[len(prefix) :]
        sites.append(Site(group[0].name, index, group, _fold_for(adapter, model, layer, first, moe)))
    return sites


def _fold_for(adapter: ArchAdapter, model: nn.Module, layer: nn.Module, first: str, moe: bool):
    parent, _, short = first.rpartition(".")
    if short in ("q_proj", "q_a_proj", "kv_a_proj_with_mqa"):
        return NormFold(layer.get_submodule(adapter.input_norm_path))
    if short in ("q_b_proj", "kv_b_proj"):
        norm = "q_a_layernorm" if short == "q_b_proj" else "kv_a_layernorm"
        return NormFold(layer.get_submodule(f"{parent}.{norm}"))
    if short == "gate_proj":
        return None if moe else NormFold(layer.get_submodule(adapter.post_attn_norm_path))
    if short == "down_proj":
        up = layer.get_submodule(f"{parent}.up_proj")
        return RowsFold(up, torch.arange(up.out_features))
    if short == "o_proj" and adapter.attention == "gqa":
        counts = adapter.head_counts(model.config)
        group = counts.num_heads // counts.num_kv_heads
        heads = torch.arange(counts.num_heads).repeat_interleave(counts.head_dim)
        dims = torch.arange(counts.head_dim).repeat(counts.num_heads)
        return RowsFold(layer.get_submodule(f"{parent}.v_proj"), (heads // group) * counts.head_dim + dims)
    return None


def smoothing_scales(site: Site, x_amax: torch.Tensor, alpha: float) -> torch.Tensor | None:
    """Per-channel s (site width,), constant within each producer row for RowsFold; None: not smoothed."""
    if site.fold is None:
        return None
    w_amax = torch.stack([t.param.detach().abs().amax(0).float() for t in site.linears]).amax(0)
    x_amax = x_amax.float().to(w_amax.device)
    if isinstance(site.fold, RowsFold):
        index = site.fold.index.to(w_amax.device)
        rows = site.fold.producer.out_features
        x_rows = torch.zeros(rows, device=w_amax.device).scatter_reduce(0, index, x_amax, "amax", include_self=False)
        w_rows = torch.zeros(rows, device=w_amax.device).scatter_reduce(0, index, w_amax, "amax", include_self=False)
        return _scale(x_rows, w_rows, alpha)[index]
    return _scale(x_amax, w_amax, alpha)


def _scale(x_amax: torch.Tensor, w_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    s = x_amax.clamp_min(1e-5).pow(alpha) / w_amax.clamp_min(1e-5).pow(1.0 - alpha)
    return torch.where((x_amax > 0) & (w_amax > 0), s.clamp(1e-5, 1e5), torch.ones_like(s))


@torch.no_grad()
def fold(site: Site, s: torch.Tensor) -> None:
    """Divide the site's tensor by s (in its producer) and multiply every reader's columns by s."""
    for t in site.linears:
        t.param.mul_(s.to(t.param.device, t.param.dtype))
    if isinstance(site.fold, NormFold):
        weight = site.fold.norm.weight
        weight.div_(s.to(weight.device, weight.dtype))
        return
    producer, index = site.fold.producer, site.fold.index.to(s.device)
    rows = torch.ones(producer.out_features, device=s.device).scatter(0, index, s)
    producer.weight.div_(rows.to(producer.weight.device, producer.weight.dtype)[:, None])
    if producer.bias is not None:
        producer.bias.div_(rows.to(producer.bias.device, producer.bias.dtype))
