"""State-dict surgery for the `prune` pass: every cut is an `index_select` on named tensors, so the result loads
with `load_state_dict(strict=True)` into the model stock transformers builds from the pruned config."""

from __future__ import annotations

import torch

from dscompress.compress.prune.layout import (
    expert_field,
    expert_groups,
    head_blocks,
    hidden_dim,
)
from dscompress.models.adapters import ArchAdapter


def top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` highest scores, in ascending index order (ties: lower index first)."""
    order = sorted(range(len(scores)), key=lambda j: (-float(scores[j]), j))
    return torch.tensor(sorted(order[:keep]), dtype=torch.long)


def grouped_top(scores: torch.Tensor, groups: int, keep_per_group: int) -> torch.Tensor:
    """`keep_per_group` highest scores inside each of `groups` equal consecutive groups."""
    size = len(scores) // groups
    return torch.cat([g * size + top(scores[g * size : (g + 1) * size], keep_per_group) for g in range(groups)])


def blocks(index: torch.Tensor, size: int) -> torch.Tensor:
    """Row indices of whole blocks of `size` rows."""
    return (index[:, None] * size + torch.arange(size)).reshape(-1)


class Surgeon:
    def __init__(self, sd: dict, config, adapter: ArchAdapter, cfg, scores: dict):
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
        if self.cfg.experts and self.adapter.is_moe_layer(self.full_config, old):
            self._drop_experts(prefix, old, sizes)

    def _heads(self, prefix: str, old: int, sizes: dict) -> None:
        attn = prefix + self.adapter.attn_path + "."
        scores = self.scores[f"layers.{old}.heads"]
        counts = self.adapter.head_counts(self.config)
        if self.adapter.attention == "mla":
            heads = top(scores, sizes["num_attention_heads"])
            for name, size in head_blocks(self.adapter, self.config).items():
                self.rows(attn + name, blocks(heads, size), dim=1 if name == "o_proj" else 0)
            self.kept_summary.setdefault("heads", []).append(heads.tolist())
            return
        group = counts.num_heads // counts.num_kv_heads
        grouped = scores.reshape(counts.num_kv_heads, group)
        if self.cfg.heads.mode == "kv_group":
            kv = top(grouped.sum(1), sizes["num_key_value_heads"])
            heads = (kv[:, None] * group + torch.arange(group)).reshape(-1)
            for name in ("k_proj", "v_proj"):
                self.rows(attn + name, blocks(kv, counts.head_dim))
        else:
            heads = grouped_top(scores, counts.num_kv_heads, sizes["num_attention_heads"] // counts.num_kv_heads)
        self.rows(attn + "q_proj", blocks(heads, counts.head_dim))
        self.rows(attn + "o_proj", blocks(heads, counts.head_dim), dim=1)
        self.kept_summary.setdefault("heads", []).append(heads.tolist())

    def _mlp(self, prefix: str, old: int, sizes: dict) -> None:
        moe = self.adapter.is_moe_layer(self.full_config, old)
        if f"layers.{old}.mlp" in self.scores:
            path = self.adapter.shared_experts_path if moe else self.adapter.mlp_path
            total = len(self.scores[f"layers.{old}.mlp"])
            field = "moe_intermediate_size" if moe else "intermediate_size"
            keep = total * sizes[field] // getattr(self.config, field) if moe else sizes[field]
            index = top(self.scores[f"layers.{old}.mlp"], keep)
            for name in ("gate_proj", "up_proj"):
                self.rows(f"{prefix}{path}.{name}", index)
            self.rows(f"{prefix}{path}.down_proj", index, dim=1)
        if moe:
            self._expert_channels(prefix + self.adapter.experts_path + ".", old, sizes["moe_intermediate_size"])

    def _expert_channels(self, prefix: str, old: int, keep: int) -> None:
        scores = self.scores[f"layers.{old}.experts"]  # (E, inter)
        inter = scores.shape[1]
        index = torch.stack([top(s, keep) for s in scores])  # (E, keep)
        gate_up, down = self.sd[prefix + "gate_up_proj"], self.sd[prefix + "down_proj"]
        rows = torch.cat([index, index + inter], dim=1)  # the gate half, then the up half
        self.sd[prefix + "gate_up_proj"] = torch.gather(gate_up, 1, rows[:, :, None].expand(-1, -1, gate_up.shape[2]))
        self.sd[prefix + "down_proj"] = torch.gather(down, 2, index[:, None, :].expand(-1, down.shape[1], -1))

    def _drop_experts(self, prefix: str, old: int, sizes: dict) -> None:
        """Whole routed experts, least routed first; DeepSeek keeps the same count in every routing group."""
        field = expert_field(self.adapter)
        groups = expert_groups(self.config, self.adapter)
        keep = sizes[field]
        index = grouped_top(self.scores[f"layers.{old}.routing"], groups, keep // groups)
        for name in ("gate_up_proj", "down_proj"):
            key = f"{prefix}{self.adapter.experts_path}.{name}"
            self.sd[key] = self.sd[key].index_select(0, index).contiguous()
        for name in ("weight", "e_score_correction_bias"):
            key = f"{prefix}{self.adapter.router_path}.{name}"
            if key in self.sd:
                self.sd[key] = self.sd[key].index_select(0, index).contiguous()
        self.kept_summary.setdefault("experts", []).append(index.tolist())

    def hidden(self, keep: int) -> None:
        index = top(self.scores["hidden"], keep)
        for name, tensor in list(self.sd.items()):
            if (dim := hidden_dim(name, self.adapter)) is not None:
                self.sd[name] = tensor.index_select(dim, index).contiguous()
        self.kept_summary["hidden"] = index.tolist()

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
