"""The `onnx-ort` graph of dense Llama / Qwen2 / Qwen3 decoders with ONNX Runtime's fused GroupQueryAttention.

The plain dynamo export spells attention out in about 40 small nodes per layer (rotary halves, repeat_kv's
Expand, cache Concat, mask arithmetic, two MatMuls, Softmax); at one decode token those nodes cost ONNX Runtime more
time than the INT4 weights themselves (profiled on SmolLM2: MatMulNBits 37% of kernel time, the small nodes about
half). This module exports the same decoder with attention as one `com.microsoft::GroupQueryAttention` per layer:
rotary inside the kernel (`do_rotary`, cos/sin tables of the model's own rotary embedding, so scaled RoPE variants
that depend on the position alone are exact), the cache appended inside, causal masking inside.

Contract differences from the plain graph (docs/EXPORT.md): the same inputs and outputs, but GroupQueryAttention
masks causally from `attention_mask`'s lengths alone (total length, and `seqlens_k` = ones per row - 1), so padding
must be on the right; rotary positions come from `position_ids` as before. The projections, norms and MLP are the
model's own modules, so quantized Linears are rewritten by export/onnx_quant.py exactly as in the plain graph.
"""

from __future__ import annotations

import torch
from torch import nn

SUPPORTED = ("llama", "qwen2", "qwen3")
# rotary variants whose cos/sin depend on the position alone (a table indexed by position is exact)
STATIC_ROPE = ("default", "linear", "llama3", "yarn")


@torch.library.custom_op("dscompress::group_query_attention", mutates_args=())
def group_query_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor,
    seqlens_k: torch.Tensor, total_length: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    position_ids: torch.Tensor, num_heads: int, kv_heads: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """What com.microsoft::GroupQueryAttention computes (do_rotary=1, not interleaved, BNSH caches not shared), for
    rows without padding: the reference the export traces and the tests compare with."""
    batch, seq, _ = query.shape
    dim = cos.shape[-1] * 2
    past = past_key.shape[2]
    c, s = cos[position_ids], sin[position_ids]
    q = _rotary(query.view(batch, seq, num_heads, dim), c, s).transpose(1, 2)
    k = _rotary(key.view(batch, seq, kv_heads, dim), c, s).transpose(1, 2)
    v = value.view(batch, seq, kv_heads, dim).transpose(1, 2)
    present_key, present_value = torch.cat([past_key, k], 2), torch.cat([past_value, v], 2)
    groups = num_heads // kv_heads
    keys, values = present_key.repeat_interleave(groups, 1), present_value.repeat_interleave(groups, 1)
    mask = torch.ones(seq, past + seq, dtype=torch.bool).tril(past)
    out = nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).reshape(batch, seq, num_heads * dim), present_key, present_value


@group_query_attention.register_fake
def _(query, key, value, past_key, past_value, seqlens_k, total_length, cos, sin, position_ids, num_heads, kv_heads,
      scale):  # fmt: skip
    batch, seq, _ = query.shape
    shape = (batch, past_key.shape[1], past_key.shape[2] + seq, past_key.shape[3])
    return query.new_empty(query.shape), past_key.new_empty(shape), past_value.new_empty(shape)


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on (batch, seq, heads, dim) with half-width (batch, seq, dim / 2) tables."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def translation_table() -> dict:
    """torch.onnx.export's custom_translation_table entry: the custom op as ONNX Runtime's contrib operator."""
    import onnx
    import onnxscript

    # onnx carries no schema of Microsoft's contrib operators; the exporter's tracer needs one, so the part of
    # GroupQueryAttention's signature used here is declared (inputs 0-9, outputs 0-2, five attributes)
    param = onnx.defs.OpSchema.FormalParameter
    inputs = ["query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length",
              "cos_cache", "sin_cache", "position_ids"]  # fmt: skip
    types = {"seqlens_k": "M", "total_sequence_length": "M", "position_ids": "P"}
    attr = onnx.defs.OpSchema.Attribute
    kinds = onnx.defs.OpSchema.AttrType
    schema = onnx.defs.OpSchema(
        "GroupQueryAttention", "com.microsoft", 1,
        inputs=[param(n, types.get(n, "T")) for n in inputs],
        outputs=[param(n, "T") for n in ("output", "present_key", "present_value")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], ""),
                          ("P", ["tensor(int64)"], "")],
        attributes=[attr("num_heads", kinds.INT, ""), attr("kv_num_heads", kinds.INT, ""),
                    attr("scale", kinds.FLOAT, ""), attr("do_rotary", kinds.INT, ""),
                    attr("rotary_interleaved", kinds.INT, "")],
    )  # fmt: skip
    attention = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "GroupQueryAttention", schema)

    def gqa(query, key, value, past_key, past_value, seqlens_k, total_length, cos, sin, position_ids,
            num_heads: int, kv_heads: int, scale: float):  # fmt: skip
        return attention(
            query, key, value, past_key, past_value, seqlens_k, total_length, cos, sin, position_ids,
            num_heads=num_heads,
            kv_num_heads=kv_heads, scale=scale, do_rotary=1, rotary_interleaved=0,
        )  # fmt: skip

    return {torch.ops.dscompress.group_query_attention.default: gqa}


def refusal(model: nn.Module) -> str | None:
    """Why `model` keeps the plain graph (None: it gets GroupQueryAttention)."""
    config = model.config
    if config.model_type not in SUPPORTED:
        return f"model type {config.model_type!r} (GroupQueryAttention export covers {', '.join(SUPPORTED)})"
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope not in STATIC_ROPE:
        return f"rope_type {rope!r} changes cos/sin with the sequence length"
    if getattr(config, "use_sliding_window", False) or any(
        kind != "full_attention" for kind in getattr(config, "layer_types", None) or []
    ):
        return "sliding-window layers"
    for layer in model.model.layers:
        attn = layer.self_attn
        if not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")):
            return f"attention module {type(attn).__name__} has no q/k/v/o projections"
        if attn.q_proj.out_features % attn.head_dim or attn.k_proj.out_features % attn.head_dim:
            return "projection widths that are not whole heads"
        if attn.head_dim % 16:  # ONNX Runtime's CPU kernel: "head_size shall be a multiple of 16"
            return f"head_dim {attn.head_dim} (GroupQueryAttention needs a multiple of 16)"
    return None


class GqaDecoder(nn.Module):
    """Flat tensors in and out (export/onnx.py's contract), the decoder loop written out with the model's modules
    and one GroupQueryAttention per layer."""

    def __init__(self, model: nn.Module, layers: int):
        super().__init__()
        self.model, self.layers = model, layers
        base = model.model
        dim = base.layers[0].self_attn.head_dim
        limit = model.config.max_position_embeddings
        probe = torch.zeros(1, 1, dim, dtype=next(model.parameters()).dtype)
        with torch.no_grad():
            cos, sin = base.rotary_emb(probe, torch.arange(limit)[None])
        self.register_buffer("cos", cos[0, :, : dim // 2].float().contiguous(), persistent=False)
        self.register_buffer("sin", sin[0, :, : dim // 2].float().contiguous(), persistent=False)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        base = self.model.model
        hidden = base.embed_tokens(input_ids)
        seqlens = (attention_mask.sum(1) - 1).to(torch.int32)
        total = torch.scalar_tensor(attention_mask.shape[1], dtype=torch.int32)
        cos, sin = self.cos.to(hidden.dtype), self.sin.to(hidden.dtype)
        present = []
        for i, layer in enumerate(base.layers):
            attn, x = layer.self_attn, layer.input_layernorm(hidden)
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
            if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm per head before the rotary
                q = attn.q_norm(q.unflatten(-1, (-1, attn.head_dim))).flatten(-2)
                k = attn.k_norm(k.unflatten(-1, (-1, attn.head_dim))).flatten(-2)
            heads, kv_heads = q.shape[-1] // attn.head_dim, k.shape[-1] // attn.head_dim
            out, key, value = torch.ops.dscompress.group_query_attention(
                q, k, v, past[2 * i], past[2 * i + 1], seqlens, total, cos, sin, position_ids, heads, kv_heads,
                attn.scaling,
            )  # fmt: skip
            hidden = hidden + attn.o_proj(out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            present += [key, value]
        return (self.model.lm_head(base.norm(hidden)), *present)
