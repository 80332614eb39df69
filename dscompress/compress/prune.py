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
- `depth`: whole decoder layers, lowest block importance (1 - cos(input, output)) or lowest perplexity impact
  (calibration loss rise with the layer skipped) first; per-layer config lists (layer_types, mlp_only_layers,
  first_k_dense_replace) follow.
- `hidden`: embedding channels everywhere they live: embeddings, every RMSNorm, every projection that reads or
  writes the residual stream, routers, experts and lm_head (a tied lm_head is cut with the embeddings).
- `experts`: whole routed experts by routing frequency on the calibration set; router rows (and DeepSeek's score
  correction bias) follow, and DeepSeek keeps the same count in each of its `n_group` routing groups.
Importance (`l1` or `activation`) is in importance.py; surgery in prune_surgery.py; scores are saved as
importance.safetensors.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import AutoModelForCausalLM

from dscompress.compress.importance import activation_scores, l1_scores, perplexity_impact
from dscompress.compress.prune_surgery import Surgeon, expert_field, expert_groups, top
from dscompress.context import PassOutput, StageContext, spinner
from dscompress.models.info import read_tensors


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
    metric: Literal["block_importance", "perplexity"] = Field(
        "block_importance", description="block_importance: 1 - cos(in, out); perplexity: loss rise, layer skipped"
    )
    windows: int = Field(8, ge=1, description="calibration windows scored per skipped layer (metric perplexity)")


class PruneConfig(BaseModel):
    """`prune:` stage. Example: `{importance: activation, mlp: {ratio: 0.25}, heads: {ratio: 0.25}}`."""

    model_config = ConfigDict(extra="forbid")
    importance: Literal["activation", "l1"] = Field("activation", description="how channels and heads are ranked")
    mlp: Size | None = Field(None, description="intermediate channels (per expert for routed experts)")
    heads: HeadSize | None = Field(None, description="query heads (mode query: the count kept in total)")
    depth: DepthSize | None = Field(None, description="decoder layers")
    hidden: Size | None = Field(None, description="embedding channels, across every norm, projection and lm_head")
    experts: Size | None = Field(None, description="routed experts per MoE layer, least routed first")
    batch_size: int = Field(8, ge=1, description="calibration windows per forward pass (activation importance)")

    @model_validator(mode="after")
    def _something(self):
        if not (self.mlp or self.heads or self.depth or self.hidden or self.experts):
            raise ValueError("prune needs at least one of mlp, heads, depth, hidden, experts")
        return self

    @property
    def needs_forward(self) -> bool:
        """Calibration forward passes: activation importance, block importance, routing counts."""
        return self.importance == "activation" or bool(self.depth) or bool(self.experts)


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
    if cfg.hidden:
        sizes["hidden_size"] = cfg.hidden.keep(text.hidden_size)
        if not 1 <= sizes["hidden_size"] <= text.hidden_size:
            problems.append(("hidden", f"keeps {sizes['hidden_size']} of {text.hidden_size} hidden channels"))
        if adapter.attention == "gqa":  # head_dim defaulted to hidden_size / heads: pin it
            sizes.setdefault("head_dim", adapter.head_counts(text).head_dim)
    if cfg.experts:
        problems += _expert_sizes(text, adapter, cfg.experts, sizes)
    return sizes, problems


def _expert_sizes(text, adapter, experts: Size, sizes: dict) -> list[tuple[str, str]]:
    if adapter.moe == "none":
        return [("experts", f"{adapter.model_type} has no routed experts; prune mlp instead")]
    field, groups = expert_field(adapter), expert_groups(text, adapter)
    total, keep = getattr(text, field), experts.keep(getattr(text, field))
    sizes[field] = keep
    if keep < text.num_experts_per_tok or keep > total:
        return [("experts", f"keeps {keep} of {total} experts; each token is routed to {text.num_experts_per_tok}, "
                 "so at least that many must remain")]  # fmt: skip
    if keep % groups or (groups > 1 and keep // groups < 2):
        return [("experts", f"keeps {keep} experts across {groups} routing groups (n_group); DeepSeek needs the "
                 f"same count, at least 2, in every group: use a multiple of {groups}")]  # fmt: skip
    return []


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
    if config.hidden and info.directory is not None and (problem := tied_problem(info)):
        problems.append(("hidden", problem))
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


def kept_layers(config, cfg: PruneConfig, scores: dict) -> list[int]:
    layers = config.get_text_config().num_hidden_layers
    if not cfg.depth:
        return list(range(layers))
    return top(scores["blocks"], cfg.depth.keep(layers)).tolist()


def importance(model, config: PruneConfig, ctx: StageContext) -> dict[str, torch.Tensor]:
    scores = l1_scores(model, ctx.adapter)
    if config.needs_forward:
        act = activation_scores(model, ctx.adapter, ctx.calibration(), config.batch_size, ctx.device)
        forward_only = {k: v for k, v in act.items() if k == "blocks" or k.endswith(".routing")}
        scores |= act if config.importance == "activation" else forward_only
    if config.depth and config.depth.metric == "perplexity":
        windows = ctx.calibration()[: config.depth.windows]
        with spinner(ctx.progress, f"perplexity impact of {len(ctx.adapter.layers(model))} layers"):
            scores["blocks"] = perplexity_impact(model, ctx.adapter, windows, config.batch_size, ctx.device)
    return scores


TIED_DISAGREE = (
    "config.json ties lm_head to the embeddings but the checkpoint's lm_head.weight differs from them; "
    "fix tie_word_embeddings in config.json, or prune mlp/heads/depth instead"
)


def tied_problem(info) -> str | None:
    """Hidden pruning cuts embeddings and lm_head with one index: refuse a tie the stored weights do not honour
    (transformers would silently tie them on load and drop the stored lm_head)."""
    if not info.config.get_text_config().tie_word_embeddings:
        return None
    names = {f"{info.adapter.embed_path}.weight", f"{info.adapter.lm_head_path}.weight"}
    found = read_tensors(info.directory, names)
    return TIED_DISAGREE if len(found) == 2 and not torch.equal(*found.values()) else None


def check_tied(model, adapter) -> None:
    """The same refusal for a model in memory whose tie is broken."""
    embed = model.get_submodule(adapter.embed_path).weight
    head = model.get_submodule(adapter.lm_head_path).weight
    if model.config.get_text_config().tie_word_embeddings and head is not embed and not torch.equal(head, embed):
        raise ValueError(f"hidden: {TIED_DISAGREE}")


def apply(model: torch.nn.Module, config: PruneConfig, ctx: StageContext) -> PassOutput:
    adapter = ctx.adapter
    before = sum(p.numel() for p in model.parameters())
    if config.hidden:
        check_tied(model, adapter)
    with torch.no_grad():
        scores = importance(model, config, ctx)
        kept = kept_layers(model.config, config, scores)
        new_config = pruned_config(model.config, adapter, config, kept)
        sizes, _ = new_sizes(model.config, adapter, config)
        surgeon = Surgeon(dict(model.state_dict()), model.config, adapter, config, scores)
        for old in kept:
            surgeon.prune_layer(old, sizes)
        if config.hidden:
            surgeon.hidden(sizes["hidden_size"])
        surgeon.renumber(kept)
        pruned = AutoModelForCausalLM.from_config(new_config, dtype=next(model.parameters()).dtype)
        pruned.load_state_dict(surgeon.sd, strict=True)
        pruned.generation_config = model.generation_config
    after = sum(p.numel() for p in pruned.parameters())
    summary = {"params_before": before, "params_after": after, "removed_pct": 100.0 * (1 - after / before),
               "kept_layers": kept, "sizes": sizes, "importance": config.importance,
               "kept": {k: v for k, v in surgeon.kept_summary.items() if k != "hidden"}}  # fmt: skip
    tensors = {k.replace("/", "_"): v.float().contiguous() for k, v in scores.items()}
    if "hidden" in surgeon.kept_summary:
        tensors["kept.hidden"] = torch.tensor(surgeon.kept_summary["hidden"], dtype=torch.int64)
    files = {"importance.safetensors": tensors}
    return PassOutput(pruned.eval(), quant=None, summary=summary, files=files, quant_invalidated=True)
