"""Architecture adapters: where each supported architecture keeps its layers, projections and heads.

Passes ask an adapter instead of pattern-matching module names, so a new architecture is one table entry.
Expert weights in transformers 5 are stacked 3-D parameters (E, out, in) used through F.linear, not Linear
modules; the adapter exposes them as `WeightTarget(kind="experts")`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from dscompress.errors import ModelSourceError

GQA_LINEARS = (("q_proj", "k_proj", "v_proj"), ("o_proj",))
# q_proj stands in for q_a_proj/q_b_proj when a DeepSeek config sets q_lora_rank to null.
MLA_LINEARS = (("q_a_proj", "q_proj", "kv_a_proj_with_mqa"), ("q_b_proj",), ("kv_b_proj",), ("o_proj",))
MLP_LINEARS = (("gate_proj", "up_proj"), ("down_proj",))
EXPERT_PARAMS = ("gate_up_proj", "down_proj")  # stacked (E, out, in), in execution order


@dataclass(frozen=True)
class HeadCounts:
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class WeightTarget:
    """One weight a pass may rewrite: a Linear's weight, or a stacked expert parameter."""

    name: str  # module path, e.g. "model.layers.0.self_attn.q_proj" or "model.layers.1.mlp.experts.down_proj"
    module: nn.Module
    attr: str  # "weight" for Linear, the parameter name for experts
    kind: Literal["linear", "experts"]
    layer: int  # decoder layer index, -1 outside the decoder stack

    @property
    def param(self) -> torch.Tensor:
        return getattr(self.module, self.attr)

    @property
    def in_features(self) -> int:
        return self.param.shape[-1]


@dataclass(frozen=True)
class ArchAdapter:
    model_type: str
    attention: Literal["gqa", "mla"]
    moe: Literal["none", "qwen3_moe", "deepseek_v3"] = "none"
    layers_path: str = "model.layers"
    embed_path: str = "model.embed_tokens"
    final_norm_path: str = "model.norm"
    lm_head_path: str = "lm_head"
    attn_path: str = "self_attn"
    input_norm_path: str = "input_layernorm"  # the norm in front of attention
    post_attn_norm_path: str = "post_attention_layernorm"  # pre-norm blocks: out = h + mlp(norm(h))
    mlp_path: str = "mlp"
    experts_path: str = "mlp.experts"
    router_path: str = "mlp.gate"
    shared_experts_path: str | None = None

    @property
    def attn_linears(self) -> tuple[tuple[str, ...], ...]:
        return MLA_LINEARS if self.attention == "mla" else GQA_LINEARS

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)

    def is_moe_layer(self, config, index: int) -> bool:
        """From the config, as the modeling code decides it."""
        if self.moe == "qwen3_moe":
            sparse_step = getattr(config, "decoder_sparse_step", 1) or 1
            return (
                index not in (getattr(config, "mlp_only_layers", None) or [])
                and config.num_experts > 0
                and (index + 1) % sparse_step == 0
            )
        if self.moe == "deepseek_v3":
            return index >= config.first_k_dense_replace and index % getattr(config, "moe_layer_freq", 1) == 0
        return False

    def head_counts(self, config) -> HeadCounts:
        heads = config.num_attention_heads
        if self.attention == "mla":
            return HeadCounts(heads, heads, config.qk_nope_head_dim + config.qk_rope_head_dim)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return HeadCounts(heads, config.num_key_value_heads, head_dim)

    def tied_embeddings(self, model: nn.Module) -> bool:
        embed = model.get_submodule(self.embed_path).weight
        return model.get_submodule(self.lm_head_path).weight is embed

    def block_linears(self, model: nn.Module, index: int) -> list[list[WeightTarget]]:
        """A decoder layer's weights in execution order, grouped by shared input (for true-sequential passes)."""
        layer = self.layers(model)[index]
        prefix = f"{self.layers_path}.{index}"
        groups = [
            self._linears(layer, f"{prefix}.{self.attn_path}", self.attn_path, names, index)
            for names in self.attn_linears
        ]
        if self.is_moe_layer(model.config, index):
            experts = layer.get_submodule(self.experts_path)
            for pname in EXPERT_PARAMS:
                name = f"{prefix}.{self.experts_path}.{pname}"
                groups.append([WeightTarget(name, experts, pname, "experts", index)])
            if self.shared_experts_path:
                for names in MLP_LINEARS:
                    groups.append(
                        self._linears(
                            layer,
                            f"{prefix}.{self.shared_experts_path}",
                            self.shared_experts_path,
                            names,
                            index,
                        )
                    )
        else:
            for names in MLP_LINEARS:
                groups.append(self._linears(layer, f"{prefix}.{self.mlp_path}", self.mlp_path, names, index))
        return [g for g in groups if g]

    @staticmethod
    def _linears(layer: nn.Module, prefix: str, path: str, names: tuple[str, ...], index: int):
        parent = layer.get_submodule(path)
        found = [WeightTarget(f"{prefix}.{n}", getattr(parent, n), "weight", "linear", index) for n in names
                 if isinstance(getattr(parent, n, None), nn.Linear)]  # fmt: skip
        return found

    def weight_targets(self, model: nn.Module) -> Iterator[WeightTarget]:
        """Every quantizable weight: all decoder projections and experts, then lm_head.

        Routers (mlp.gate) are never listed: they are tiny and decide which experts run.
        """
        for index in range(len(self.layers(model))):
            for group in self.block_linears(model, index):
                yield from group
        yield WeightTarget(self.lm_head_path, model.get_submodule(self.lm_head_path), "weight", "linear", -1)


ADAPTERS: dict[str, ArchAdapter] = {
    "llama": ArchAdapter("llama", attention="gqa"),
    "qwen2": ArchAdapter("qwen2", attention="gqa"),
    "qwen3": ArchAdapter("qwen3", attention="gqa"),
    "qwen3_moe": ArchAdapter("qwen3_moe", attention="gqa", moe="qwen3_moe"),
    "deepseek_v3": ArchAdapter(
        "deepseek_v3", attention="mla", moe="deepseek_v3", shared_experts_path="mlp.shared_experts"
    ),
}


def adapter_for(config) -> ArchAdapter:
    """The adapter for a transformers config, or a one-line refusal naming what is supported."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ModelSourceError(
            f"unsupported architecture {model_type!r}; dscompress supports {', '.join(sorted(ADAPTERS))}. "
            "Fix: convert the model to one of these, or open an issue for an adapter"
        )
    return ADAPTERS[model_type]
