"""`prune` pass: structured pruning of MLP channels, attention heads (grouped-query and MLA aware) and depth.

The pruned model is rebuilt from its new config and loaded with `load_state_dict(strict=True)`, so every shape
and module attribute agrees with what stock transformers builds from config.json: the artifact loads with
`AutoModelForCausalLM.from_pretrained` and no custom code. Sizes are uniform across layers (config fields are
single numbers); each layer keeps its own most important channels and heads.

- `mlp`: intermediate channels of gate/up/down in dense layers, shared experts and, per expert, routed experts.
- `heads`, mode `query`: the same number of query heads dropped inside every KV group; `num_key_value_heads` stays.
  Mode `kv_group`: whole KV groups with their query heads. `head_dim` is never cut (RoPE) and is written
  explicitly. DeepSeek-V3 MLA: heads are dropped consistently in q_b_proj (or q_proj), kv_b_proj and o_proj;
  MLA has no KV groups, so `kv_group` is refused for it.
- `depth`: whole decoder layers, lowest block importance (1 - cos(input, output)) first; per-layer config lists
  (layer_types, mlp_only_layers, first_k_dense_replace) follow.
Importance (`l1` or `activation`) is in importance.py; scores are saved as importance.safetensors.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import AutoModelForCausalLM

from dscompress.compress.importance import activation_scores, head_blocks, l1_scores
from dscompress.context import PassOutput, StageContext


class Size(BaseModel):
    """Exactly one of `ratio` (share removed) or `size` (what remains)."""

    model_config = ConfigDict(extra="forbid")
    ratio: float | None = Field(None, ge=0, lt=1, description="share removed")
    size: int | None = Field(None, ge=1, description="what remains")

    @model_validator(mode="after")
    def _one(self):
        if (self.ratio is None) == (self.size is None):
            raise ValueError("give exactly one of ratio or size")
        return self

    def keep(self, total: int) -> int:
        return self.size if self.size is not None else total - round(total * self.ratio)


class HeadSize(Size):
    mode: Literal["query", "kv_group"] = Field("query", description="query: heads inside each KV group; kv_group")


class DepthSize(Size):
    metric: Literal["block_importance"] = "block_importance"


class PruneConfig(BaseModel):
    """`prune:` stage. Example: `{importance: activation, mlp: {ratio: 0.25}, heads: {ratio: 0.25}}`."""

    model_config = ConfigDict(extra="forbid")
    importance: Literal["activation", "l1"] = Field("activation", description="how channels and heads are ranked")
    mlp: Size | None = Field(None, description="intermediate channels (per expert for routed experts)")
    heads: HeadSize | None = Field(None, description="query heads (mode query: the count kept in total)")
    depth: DepthSize | None = Field(None, description="decoder layers")
    batch_size: int = Field(8, ge=1, description="calibration windows per forward pass (activation importance)")

    @model_validator(mode="after")
    def _something(self):
        if not (self.mlp or self.heads or self.depth):
            raise ValueError("prune needs at least one of mlp, heads, depth")
        return self


# ---- sizes (used by `plan` and `validate` too) ----------------------------------------------------------------
def new_sizes(config, adapter, cfg: PruneConfig) -> tuple[dict, list[tuple[str, str]]]:
    """The config fields after pruning, and (field, problem) for targets the model cannot take."""
    text = config.get_text_config()
    sizes, problems = {}, []
    if cfg.mlp:
        for field in ("intermediate_size", "moe_intermediate_size"):
            if getattr(text, field, None):
                sizes[field] = cfg.mlp.keep(getattr(text, field))
                if not 1 <= sizes[field] <= getattr(text, field):
                    problems.append(("mlp", f"keeps {sizes[field]} of {getattr(text, field)} {field}"))
    if cfg.heads:
        problems += _head_sizes(text, adapter, cfg.heads, sizes)
    if cfg.depth:
        sizes["num_hidden_layers"] = cfg.depth.keep(text.num_hidden_layers)
        if not 1 <= sizes["num_hidden_layers"] <= text.num_hidden_layers:
            problems.append(("depth", f"keeps {sizes['num_hidden_layers']} of {text.num_hidden_layers} layers"))
    return sizes, problems


def _head_sizes(text, adapter, heads: HeadSize, sizes: dict) -> list[tuple[str, str]]:
    counts = adapter.head_counts(text)
    if adapter.attention == "mla":
        if heads.mode == "kv_group":
            return [("heads", "mode kv_group: MLA (DeepSeek) has no KV groups, every head decompresses its own K/V "
                     "from one shared latent; use mode: query")]  # fmt: skip
        keep = heads.keep(counts.num_heads)
        sizes |= {"num_attention_heads": keep, "num_key_value_heads": keep}
        return [] if keep >= 1 else [("heads", f"ratio {heads.ratio} leaves no heads")]
    group = counts.num_heads // counts.num_kv_heads
    if heads.mode == "kv_group":
        kv = heads.keep(counts.num_kv_heads)
        if kv < 1 or kv > counts.num_kv_heads:
            return [("heads", f"keeps {kv} of {counts.num_kv_heads} KV groups; at least 1 must remain")]
        sizes |= {"num_attention_heads": kv * group, "num_key_value_heads": kv, "head_dim": counts.head_dim}
        return []
    per_group = group - round(group * heads.ratio) if heads.ratio is not None else None
    if heads.size is not None:
        if heads.size % counts.num_kv_heads:
            return [("heads", f"{heads.size} query heads do not divide across {counts.num_kv_heads} KV groups; "
                     f"use a multiple of {counts.num_kv_heads}")]  # fmt: skip
        per_group = heads.size // counts.num_kv_heads
    if per_group < 1 or per_group > group:
        return [("heads", f"leaves {per_group} query heads per KV group (of {group}); at least 1 must remain")]
    sizes |= {"num_attention_heads": per_group * counts.num_kv_heads, "head_dim": counts.head_dim}
    return []


def check(config: PruneConfig, info) -> list[tuple[str, str]]:
    problems = new_sizes(info.config, info.adapter, config)[1]
    if config.depth and info.adapter.moe == "qwen3_moe" and (getattr(info.config, "decoder_sparse_step", 1) or 1) != 1:
        problems.append(("depth", "decoder_sparse_step > 1 ties MoE placement to layer numbers; prune mlp instead"))
    return problems


def pruned_config(config, adapter, cfg: PruneConfig, kept_layers: list[int] | None = None):
    """A deep copy of `config` with the pruned sizes and the per-layer lists of the kept layers."""
    sizes, problems = new_sizes(config, adapter, cfg)
    if problems:
        raise ValueError(f"{problems[0][0]}: {problems[0][1]}")
    new = copy.deepcopy(config)
    for field, value in sizes.items():
        setattr(new, field, value)
    if kept_layers is not None:
        _remap_layer_lists(new, config, adapter, kept_layers)
    return new


def _remap_layer_lists(new, old, adapter, kept: list[int]) -> None:
    if getattr(old, "layer_types", None):
        new.layer_types = [old.layer_types[i] for i in kept]
    if adapter.moe == "qwen3_moe":
        if (getattr(old, "decoder_sparse_step", 1) or 1) != 1:
            raise ValueError("depth: decoder_sparse_step > 1 ties MoE placement to layer numbers; prune mlp instead")
        new.mlp_only_layers = [j for j, i in enumerate(kept) if i in (old.mlp_only_layers or [])]
    if adapter.moe == "deepseek_v3":
        if getattr(old, "moe_layer_freq", 1) != 1:
            raise ValueError("depth: moe_layer_freq > 1 ties MoE placement to layer numbers; prune mlp instead")
        new.first_k_dense_replace = sum(1 for i in kept if i < old.first_k_dense_replace)


# ---- surgery on the state dict --------------------------------------------------------------------------------
def _top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` highest scores, in ascending index order (ties: lower index first)."""
    order = sorted(range(len(scores)), key=lambda j: (-float(scores[j]), j))
    return torch.tensor(sorted(order[:keep]), dtype=torch.long)


def _blocks(index: torch.Tensor, size: int) -> torch.Tensor:
    """Row indices of whole blocks of `size` rows."""
    return (index[:, None] * size + torch.arange(size)).reshape(-1)


class Surgeon:
    def __init__(self, sd: dict, config, adapter, cfg: PruneConfig, scores: dict):
        self.sd, self.config, self.adapter, self.cfg, self.scores = sd, config.get_text_config(), adapter, cfg, scores
        self.full_config = config
        self.kept_summary: dict[str, list] = {}

    def rows(self, key: str, index: torch.Tensor, dim: int = 0) -> None:
        for suffix in (".weight", ".bias"):
            name = key + suffix
            if name in self.sd and (suffix == ".weight" or dim == 0):
                self.sd[name] = self.sd[name].index_select(dim, index).contiguous()

    def prune_layer(self, old: int, sizes: dict) -> None:
        prefix = f"{self.adapter.layers_path}.{old}."
        if "num_attention_heads" in sizes:
            self._heads(prefix, old, sizes)
        if self.cfg.mlp:
            self._mlp(prefix, old, sizes)

    def _heads(self, prefix: str, old: int, sizes: dict) -> None:
        attn = prefix + self.adapter.attn_path + "."
        scores = self.scores[f"layers.{old}.heads"]
        counts = self.adapter.head_counts(self.config)
        if self.adapter.attention == "mla":
            heads = _top(scores, sizes["num_attention_heads"])
            for name, size in head_blocks(self.adapter, self.config).items():
                self.rows(attn + name, _blocks(heads, size), dim=1 if name == "o_proj" else 0)
            self.kept_summary.setdefault("heads", []).append(heads.tolist())
            return
        group = counts.num_heads // counts.num_kv_heads
        grouped = scores.reshape(counts.num_kv_heads, group)
        if self.cfg.heads.mode == "kv_group":
            kv = _top(grouped.sum(1), sizes["num_key_value_heads"])
            heads = (kv[:, None] * group + torch.arange(group)).reshape(-1)
            for name in ("k_proj", "v_proj"):
                self.rows(attn + name, _blocks(kv, counts.head_dim))
        else:
            per_group = sizes["num_attention_heads"] // counts.num_kv_heads
            heads = torch.cat([g * group + _top(grouped[g], per_group) for g in range(counts.num_kv_heads)])
        self.rows(attn + "q_proj", _blocks(heads, counts.head_dim))
        self.rows(attn + "o_proj", _blocks(heads, counts.head_dim), dim=1)
        self.kept_summary.setdefault("heads", []).append(heads.tolist())

    def _mlp(self, prefix: str, old: int, sizes: dict) -> None:
        moe = self.adapter.is_moe_layer(self.full_config, old)
        if f"layers.{old}.mlp" in self.scores:
            path = self.adapter.shared_experts_path if moe else self.adapter.mlp_path
            total = len(self.scores[f"layers.{old}.mlp"])
            field = "moe_intermediate_size" if moe else "intermediate_size"
            keep = total * sizes[field] // getattr(self.config, field) if moe else sizes[field]
            index = _top(self.scores[f"layers.{old}.mlp"], keep)
            for name in ("gate_proj", "up_proj"):
                self.rows(f"{prefix}{path}.{name}", index)
            self.rows(f"{prefix}{path}.down_proj", index, dim=1)
        if moe:
            self._experts(prefix + self.adapter.experts_path + ".", old, sizes["moe_intermediate_size"])

    def _experts(self, prefix: str, old: int, keep: int) -> None:
        scores = self.scores[f"layers.{old}.experts"]  # (E, inter)
        inter = scores.shape[1]
        index = torch.stack([_top(s, keep) for s in scores])  # (E, keep)
        gate_up, down = self.sd[prefix + "gate_up_proj"], self.sd[prefix + "down_proj"]
        rows = torch.cat([index, index + inter], dim=1)  # the gate half, then the up half
        self.sd[prefix + "gate_up_proj"] = torch.gather(gate_up, 1, rows[:, :, None].expand(-1, -1, gate_up.shape[2]))
        self.sd[prefix + "down_proj"] = torch.gather(down, 2, index[:, None, :].expand(-1, down.shape[1], -1))

    def renumber(self, kept: list[int]) -> None:
        base = self.adapter.layers_path + "."
        renamed = {}
        for name, tensor in self.sd.items():
            if not name.startswith(base):
                renamed[name] = tensor
                continue
            old, rest = name[len(base) :].split(".", 1)
            if int(old) in kept:
                renamed[f"{base}{kept.index(int(old))}.{rest}"] = tensor
        self.sd = renamed


def kept_layers(config, cfg: PruneConfig, scores: dict) -> list[int]:
    layers = config.get_text_config().num_hidden_layers
    if not cfg.depth:
        return list(range(layers))
    return _top(scores["blocks"], cfg.depth.keep(layers)).tolist()


def apply(model: torch.nn.Module, config: PruneConfig, ctx: StageContext) -> PassOutput:
    adapter = ctx.adapter
    before = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        scores = l1_scores(model, adapter)
        if config.importance == "activation" or config.depth:
            act = activation_scores(model, adapter, ctx.calibration(), config.batch_size, ctx.device)
            scores |= act if config.importance == "activation" else {"blocks": act["blocks"]}
        kept = kept_layers(model.config, config, scores)
        new_config = pruned_config(model.config, adapter, config, kept)
        sizes, _ = new_sizes(model.config, adapter, config)
        surgeon = Surgeon(dict(model.state_dict()), model.config, adapter, config, scores)
        for old in kept:
            surgeon.prune_layer(old, sizes)
        surgeon.renumber(kept)
        pruned = AutoModelForCausalLM.from_config(new_config, dtype=next(model.parameters()).dtype)
        pruned.load_state_dict(surgeon.sd, strict=True)
        pruned.generation_config = model.generation_config
    after = sum(p.numel() for p in pruned.parameters())
    summary = {"params_before": before, "params_after": after, "removed_pct": 100.0 * (1 - after / before),
               "kept_layers": kept, "sizes": sizes, "importance": config.importance}  # fmt: skip
    files = {"importance.safetensors": {k.replace("/", "_"): v.float().contiguous() for k, v in scores.items()}}
    return PassOutput(pruned.eval(), quant=None, summary=summary, files=files, quant_invalidated=True)
