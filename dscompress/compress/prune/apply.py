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
The config is config.py; sizes after pruning sizes.py; where dimensions live layout.py; importance (`l1` or
`activation`) scores.py; surgery surgery.py; `plan`'s advice advice.py. Scores are saved as importance.safetensors.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from dscompress.compress.prune.config import PruneConfig
from dscompress.compress.prune.scores import activation_scores, l1_scores, perplexity_impact
from dscompress.compress.prune.sizes import new_sizes, pruned_config
from dscompress.compress.prune.surgery import Surgeon, top
from dscompress.context import PassOutput, StageContext, spinner
from dscompress.models.info import read_tensors


def check(config: PruneConfig, info) -> list[tuple[str, str]]:
    problems = new_sizes(info.config, info.adapter, config)[1]
    if config.hidden and info.directory is not None and (problem := tied_problem(info)):
        problems.append(("hidden", problem))
    if config.depth and info.adapter.moe == "qwen3_moe" and (getattr(info.config, "decoder_sparse_step", 1) or 1) != 1:
        problems.append(("depth", "decoder_sparse_step > 1 ties MoE placement to layer numbers; prune mlp instead"))
    return problems


def kept_layers(model_config, cfg: PruneConfig, scores: dict) -> list[int]:
    layers = model_config.get_text_config().num_hidden_layers
    if not cfg.depth:
        return list(range(layers))
    return top(scores["blocks"], cfg.depth.keep(layers)).tolist()


def compute_scores(model, config: PruneConfig, ctx: StageContext) -> dict[str, torch.Tensor]:
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
        scores = compute_scores(model, config, ctx)
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
