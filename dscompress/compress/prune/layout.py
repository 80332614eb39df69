"""Where a model's prunable dimensions live: which tensor dimension holds embedding channels, how many rows a
head owns in each projection, and how routed experts are counted and grouped. Shapes only, no tensors."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dscompress.models.adapters import ArchAdapter


HIDDEN_READERS = ("q_proj", "k_proj", "v_proj", "q_a_proj", "kv_a_proj_with_mqa", "gate_proj", "up_proj")


HIDDEN_WRITERS = ("o_proj", "down_proj")


def hidden_dim(name: str, adapter: ArchAdapter) -> int | None:
    """The dimension of state-dict tensor `name` that indexes embedding channels, or None."""
    if name in (f"{adapter.embed_path}.weight", f"{adapter.lm_head_path}.weight"):
        return 1
    if name == f"{adapter.final_norm_path}.weight":
        return 0
    base = adapter.layers_path + "."
    if not name.startswith(base):
        return None
    rest = name[len(base) :].split(".", 1)[1]
    exact = {f"{adapter.input_norm_path}.weight": 0, f"{adapter.post_attn_norm_path}.weight": 0,
             f"{adapter.experts_path}.gate_up_proj": 2, f"{adapter.experts_path}.down_proj": 1,
             f"{adapter.router_path}.weight": 1}  # fmt: skip
    if rest in exact:
        return exact[rest]
    module, _, param = rest.rpartition(".")
    leaf = module.rpartition(".")[2]
    if leaf in HIDDEN_READERS and param == "weight":
        return 1
    if leaf in HIDDEN_WRITERS and param in ("weight", "bias"):
        return 0
    return None


def expert_field(adapter: ArchAdapter) -> str:
    return "n_routed_experts" if adapter.moe == "deepseek_v3" else "num_experts"


def expert_groups(config, adapter: ArchAdapter) -> int:
    """DeepSeek routes inside `n_group` equal groups of experts; Qwen3-MoE has one group."""
    return (getattr(config, "n_group", None) or 1) if adapter.moe == "deepseek_v3" else 1


def head_blocks(adapter: ArchAdapter, config) -> dict[str, int]:
    """Rows (or columns, for o_proj) each head owns in each projection."""
    text = config.get_text_config()
    if adapter.attention == "mla":
        qk = text.qk_nope_head_dim + text.qk_rope_head_dim
        q_name = "q_b_proj" if text.q_lora_rank else "q_proj"
        return {q_name: qk, "kv_b_proj": text.qk_nope_head_dim + text.v_head_dim, "o_proj": text.v_head_dim}
    d = adapter.head_counts(text).head_dim
    return {"q_proj": d, "o_proj": d}
