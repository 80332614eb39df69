"""QuaRot-style rotation before int8 calibration (arXiv 2404.00456): the float model's output is unchanged, its
activations lose their outlier channels.

Offline (folded into the weights; the result is a stock checkpoint):
1. RMSNorm scales fold into the Linears that read them (q/k/v, gate/up, lm_head) and become ones, so each norm
   commutes with an orthogonal R: RMSNorm(x R) = RMSNorm(x) R (R keeps every token's norm).
2. The residual stream is rotated by R (hidden x hidden, `random_orthogonal_like_hadamard`): the embedding
   E -> E R, readers W -> W R (q/k/v, gate/up, lm_head), writers W -> R^T W (o_proj, down_proj, with biases).
   Tied embeddings are untied (the embedding is E R, lm_head is (E diag(g_final)) R): the checkpoint grows by one
   vocab x hidden matrix, which the report states.
3. Per attention head, the value/output pair is rotated by a Hadamard matrix of the head width: v_proj rows
   (and bias) H v, o_proj columns W_o H (attention mixes positions, never channels within a head).
Online (quant/hadamard.py; kept by the int8 pass as metadata, applied around the activation quantizer): the
down_proj input, which SwiGLU's products make the most outlier-heavy activation of the block.

Supported: dense decoders with grouped-query attention (Llama, Qwen2, Qwen3; Qwen2's q/k/v biases sit on the
output side and stay as they are; Qwen3's q/k norms act inside heads and are untouched). Refused: MoE layers (the
router and every expert read the residual stream: not written yet) and DeepSeek's MLA.
"""

from __future__ import annotations

import torch
from torch import nn

from dscompress.errors import RecipeError
from dscompress.quant.hadamard import block_factors, random_orthogonal_like_hadamard, rotate, sylvester

SUPPORTED = ("llama", "qwen2", "qwen3")


def refusal(model_type: str) -> str | None:
    if model_type in SUPPORTED:
        return None
    return (
        f"rotation supports dense {', '.join(SUPPORTED)} decoders, not {model_type!r} (MoE routers and experts, "
        "and MLA's low-rank projections, are not rotated yet); set rotate: false"
    )


def check_rotate(config, info) -> list[tuple[str, str]]:
    """`validate`'s rule for the weight-only passes' `rotate` field: the architecture must be one rotation handles."""
    problem = refusal(info.config.model_type) if config.rotate else None
    return [("rotate", problem)] if problem else []


def rotate_first(model: nn.Module, ctx, config, key: str) -> dict | None:
    """The offline rotation before a weight-only pass (config.rotate), or None. Refuses, for Python callers that
    skip `validate`, an architecture rotation does not handle."""
    if not config.rotate:
        return None
    if problem := refusal(model.config.model_type):
        raise RecipeError(f"{key}.rotate: {problem}")
    info = rotate_model(model, ctx.adapter, ctx.seed)
    return info | {"dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}


def _fold_norm_and_rotate(norm: nn.Module, readers: list[nn.Linear], r: torch.Tensor) -> None:
    g = norm.weight.detach().double()
    for lin in readers:
        lin.weight.copy_(((lin.weight.double() * g) @ r).to(lin.weight.dtype))
    norm.weight.fill_(1.0)


def _rotate_writer(lin: nn.Linear, r: torch.Tensor) -> None:
    lin.weight.copy_((r.T @ lin.weight.double()).to(lin.weight.dtype))
    if lin.bias is not None:
        lin.bias.copy_((r.T @ lin.bias.double()).to(lin.bias.dtype))


def _rotate_heads(v_proj: nn.Linear, o_proj: nn.Linear, kv_heads: int, heads: int, head_dim: int) -> None:
    h = sylvester(head_dim)
    w = v_proj.weight.double().reshape(kv_heads, head_dim, -1)
    v_proj.weight.copy_((h @ w).reshape(v_proj.weight.shape).to(v_proj.weight.dtype))
    if v_proj.bias is not None:
        v_proj.bias.copy_((v_proj.bias.double().reshape(kv_heads, head_dim) @ h).reshape(-1).to(v_proj.bias.dtype))
    wo = o_proj.weight.double().reshape(o_proj.out_features, heads, head_dim)
    o_proj.weight.copy_((wo @ h).reshape(o_proj.weight.shape).to(o_proj.weight.dtype))


@torch.no_grad()
def rotate_model(model: nn.Module, adapter, seed: int) -> dict:
    """Steps 1-3 of the module docstring, in place. Returns what the report states."""
    config = model.config.get_text_config()
    counts = adapter.head_counts(config)
    r = random_orthogonal_like_hadamard(config.hidden_size, seed)
    embed = model.get_submodule(adapter.embed_path)
    head = model.get_submodule(adapter.lm_head_path)
    untied = adapter.tied_embeddings(model)
    if untied:
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
        config.tie_word_embeddings = False
    embed.weight.copy_((embed.weight.double() @ r).to(embed.weight.dtype))
    for layer in adapter.layers(model):
        attn, mlp = layer.get_submodule(adapter.attn_path), layer.get_submodule(adapter.mlp_path)
        _fold_norm_and_rotate(layer.get_submodule(adapter.input_norm_path), [attn.q_proj, attn.k_proj, attn.v_proj], r)
        _rotate_heads(attn.v_proj, attn.o_proj, counts.num_kv_heads, counts.num_heads, counts.head_dim)
        _rotate_writer(attn.o_proj, r)
        _fold_norm_and_rotate(layer.get_submodule(adapter.post_attn_norm_path), [mlp.gate_proj, mlp.up_proj], r)
        _rotate_writer(mlp.down_proj, r)
    _fold_norm_and_rotate(model.get_submodule(adapter.final_norm_path), [head], r)
    return {"residual": f"{config.hidden_size}x{config.hidden_size} seed {seed}", "heads": counts.head_dim,
            "untied_embeddings": untied}  # fmt: skip


class OnlineRotation:
    """The down_proj inputs in the rotated basis for the duration of a pass: W -> W M and a first pre-hook
    x -> x M, so calibration and fake quantization see the rotated activation. `finish` moves the weights back
    (W M M = W) and removes the hooks; the activation quantizer then rotates around itself (quant/actquant.py)."""

    def __init__(self, model: nn.Module, adapter):
        self.factors: dict[str, tuple[int, int]] = {}
        self.handles = []
        for index in range(len(adapter.layers(model))):
            name = f"{adapter.layers_path}.{index}.{adapter.mlp_path}.down_proj"
            lin = model.get_submodule(name)
            _, a, b = block_factors(lin.in_features)
            self.factors[name] = (a, b)
            lin.weight.data = rotate(lin.weight.data, a, b)
            hook = lin.register_forward_pre_hook(lambda m, args, a=a, b=b: (rotate(args[0], a, b), *args[1:]),
                                                 prepend=True)  # fmt: skip
            self.handles.append(hook)
        self.model = model

    def finish(self) -> dict[str, tuple[int, int]]:
        for h in self.handles:
            h.remove()
        for name, (a, b) in self.factors.items():
            lin = self.model.get_submodule(name)
            lin.weight.data = rotate(lin.weight.data, a, b)
        return self.factors
