"""The model's config after a prune stage, and the problems a target size has: used by the pass, `plan` and
`validate` (no tensors, so it runs on a config alone)."""

from __future__ import annotations

import copy

from dscompress.compress.prune.config import HeadSize, PruneConfig, Size
from dscompress.compress.prune.layout import expert_field, expert_groups


# ---- sizes (used by `plan` and `validate` too) ----------------------------------------------------------------
def new_sizes(model_config, adapter, cfg: PruneConfig) -> tuple[dict, list[tuple[str, str]]]:
    """The config fields after pruning, and (field, problem) for targets the model cannot take."""
    text = model_config.get_text_config()
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


def pruned_config(model_config, adapter, cfg: PruneConfig, kept_layers: list[int] | None = None):
    """A deep copy of `model_config` (transformers) with the pruned sizes and the per-layer lists of the kept layers."""
    sizes, problems = new_sizes(model_config, adapter, cfg)
    if problems:
        raise ValueError(f"{problems[0][0]}: {problems[0][1]}")
    new = copy.deepcopy(model_config)
    for field, value in sizes.items():
        setattr(new, field, value)
    if kept_layers is not None:
        _remap_layer_lists(new, model_config, adapter, kept_layers)
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
