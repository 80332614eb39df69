"""Importance scores for structured pruning: `l1` (weights a channel or head owns) and `activation` (Minitron,
arXiv 2407.14679: calibration forward passes, L2 over the batch of the mean over the sequence).

Scores are plain tensors keyed by what they rank, saved with the stage as importance.safetensors:
    layers.{i}.mlp       (intermediate,)        MLP neurons (dense layers and shared experts)
    layers.{i}.experts   (experts, moe_inter)   routed-expert neurons (always L1: they run inside one fused op)
    layers.{i}.heads     (query heads,)         attention heads (GQA query heads, or MLA heads)
    layers.{i}.routing   (experts,)             tokens routed to each expert on the calibration set
    hidden               (hidden_size,)         embedding channels: norm outputs (activation) or owned weights (l1)
    blocks               (layers,)              1 - cos(block input, block output), averaged over tokens
"""

from __future__ import annotations

import torch

from dscompress.compress.prune.layout import head_blocks, hidden_dim
from dscompress.models.adapters import ArchAdapter


def mlp_modules(adapter: ArchAdapter, model, index: int):
    """(gate, up, down) Linear modules of a layer's dense MLP or shared experts, or None."""
    layer = adapter.layers(model)[index]
    path = adapter.shared_experts_path if adapter.is_moe_layer(model.config, index) else adapter.mlp_path
    if path is None:
        return None
    mlp = layer.get_submodule(path)
    return mlp.gate_proj, mlp.up_proj, mlp.down_proj


def l1_scores(model, adapter: ArchAdapter) -> dict[str, torch.Tensor]:
    scores = {}
    config = model.config.get_text_config()
    blocks = head_blocks(adapter, config)
    heads = config.num_attention_heads
    for i, layer in enumerate(adapter.layers(model)):
        attn = layer.get_submodule(adapter.attn_path)
        total = torch.zeros(heads, dtype=torch.float64)
        for name, size in blocks.items():
            w = getattr(attn, name).weight.detach().abs().double()
            w = w.T if name == "o_proj" else w
            total += w.reshape(heads, size, -1).sum((1, 2))
        scores[f"layers.{i}.heads"] = total
        if mods := mlp_modules(adapter, model, i):
            gate, up, down = (m.weight.detach().abs().double() for m in mods)
            scores[f"layers.{i}.mlp"] = gate.sum(1) + up.sum(1) + down.sum(0)
        if adapter.is_moe_layer(model.config, i):
            experts = layer.get_submodule(adapter.experts_path)
            gu, dn = experts.gate_up_proj.detach().abs().double(), experts.down_proj.detach().abs().double()
            inter = dn.shape[-1]
            scores[f"layers.{i}.experts"] = gu[:, :inter].sum(-1) + gu[:, inter:].sum(-1) + dn.sum(1)
    scores["hidden"] = hidden_l1(model.state_dict(), adapter, config.hidden_size)
    return scores


def hidden_l1(sd: dict, adapter: ArchAdapter, hidden: int) -> torch.Tensor:
    """L1 of every weight that reads or writes each embedding channel (norm gains included)."""

    total = torch.zeros(hidden, dtype=torch.float64)
    seen = set()
    for name, tensor in sd.items():
        dim = hidden_dim(name, adapter)
        if dim is None or tensor.data_ptr() in seen:  # a tied lm_head counts once
            continue
        seen.add(tensor.data_ptr())
        t = tensor.detach().abs().double().movedim(dim, 0)
        total += t.reshape(hidden, -1).sum(1)
    return total


class _Collector:
    """Hooks that aggregate per-sample means over the sequence, then L2 over samples (Minitron)."""

    def __init__(self, model, adapter: ArchAdapter):
        self.sq: dict[str, torch.Tensor] = {}
        self.block_cos: torch.Tensor | None = None
        self.tokens = 0
        self.handles = []
        config = model.config.get_text_config()
        heads = config.num_attention_heads
        layers = adapter.layers(model)
        for i, layer in enumerate(layers):
            attn = layer.get_submodule(adapter.attn_path)
            self.handles.append(attn.o_proj.register_forward_pre_hook(self._per_head(f"layers.{i}.heads", heads)))
            if mods := mlp_modules(adapter, model, i):
                self.handles.append(mods[2].register_forward_pre_hook(self._per_channel(f"layers.{i}.mlp")))
            self.handles.append(layer.register_forward_hook(self._block(i, len(layers)), with_kwargs=True))
            for path in (adapter.input_norm_path, adapter.post_attn_norm_path):
                norm = layer.get_submodule(path)
                self.handles.append(norm.register_forward_hook(lambda m, a, out: self._add_hidden(out)))
            if adapter.is_moe_layer(model.config, i):
                experts = layer.get_submodule(adapter.experts_path)
                count = self._routing(f"layers.{i}.routing")
                self.handles.append(experts.register_forward_pre_hook(count))
        final = model.get_submodule(adapter.final_norm_path)
        self.handles.append(final.register_forward_hook(lambda m, a, out: self._add_hidden(out)))
        self.counts: dict[str, torch.Tensor] = {}
        self.hidden_sq: torch.Tensor | None = None

    def _add(self, key: str, per_sample: torch.Tensor) -> None:  # (B, C) means over the sequence
        value = per_sample.double().pow(2).sum(0).cpu()
        self.sq[key] = value if key not in self.sq else self.sq[key] + value

    def _add_hidden(self, out: torch.Tensor) -> None:
        """Minitron's embedding-channel score: norm outputs, summed over every norm of the model."""
        value = out.detach().abs().mean(1).double().pow(2).sum(0).cpu()
        self.hidden_sq = value if self.hidden_sq is None else self.hidden_sq + value

    def _routing(self, key):
        def hook(module, args):  # experts(hidden_states, top_k_index, top_k_weights)
            index = args[1].reshape(-1).cpu()
            counts = torch.bincount(index, minlength=module.gate_up_proj.shape[0]).double()
            self.counts[key] = counts if key not in self.counts else self.counts[key] + counts

        return hook

    def _per_channel(self, key):
        return lambda m, args: self._add(key, args[0].detach().abs().mean(1))

    def _per_head(self, key, heads):
        def hook(m, args):
            x = args[0].detach()
            self._add(key, x.reshape(*x.shape[:2], heads, -1).norm(dim=-1).mean(1))

        return hook

    def _block(self, index: int, layers: int):
        def hook(module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(hidden_in.float(), hidden_out.float(), dim=-1)
            if self.block_cos is None:
                self.block_cos = torch.zeros(layers, dtype=torch.float64)
            self.block_cos[index] += float((1.0 - cos).double().sum())
            if index == 0:
                self.tokens += cos.numel()

        return hook

    def result(self) -> dict[str, torch.Tensor]:
        for h in self.handles:
            h.remove()
        scores = {k: v.sqrt() for k, v in self.sq.items()} | self.counts
        scores["blocks"] = self.block_cos / max(self.tokens, 1)
        scores["hidden"] = self.hidden_sq.sqrt()
        return scores


@torch.no_grad()
def activation_scores(model, adapter: ArchAdapter, windows: torch.Tensor, batch_size: int, device) -> dict:
    """Calibration forward passes; routed experts keep their L1 scores."""
    model.to(device).eval()
    collector = _Collector(model, adapter)
    backbone = model.get_submodule(adapter.layers_path.rsplit(".", 1)[0])
    try:
        for start in range(0, len(windows), batch_size):
            backbone(windows[start : start + batch_size].to(device), use_cache=False)
    finally:
        scores = collector.result()
    model.to("cpu")
    scores |= {k: v for k, v in l1_scores(model, adapter).items() if k.endswith(".experts")}
    return scores


@torch.no_grad()
def perplexity_impact(model, adapter: ArchAdapter, windows: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    """Per layer: mean next-token loss with that layer skipped (its output replaced by its input), minus the loss
    of the whole model. Higher means the layer matters more."""
    model.to(device).eval()

    def loss() -> float:
        total = 0.0
        for start in range(0, len(windows), batch_size):
            ids = windows[start : start + batch_size].to(device)
            total += float(model(ids, labels=ids, use_cache=False).loss) * len(ids)
        return total / len(windows)

    base, impact = loss(), []
    for layer in adapter.layers(model):
        handle = layer.register_forward_hook(_skip, with_kwargs=True)
        try:
            impact.append(loss() - base)
        finally:
            handle.remove()
    model.to("cpu")
    return torch.tensor(impact, dtype=torch.float64)


def _skip(module, args, kwargs, output):
    hidden_in = args[0] if args else kwargs["hidden_states"]
    return (hidden_in, *output[1:]) if isinstance(output, tuple) else hidden_in
