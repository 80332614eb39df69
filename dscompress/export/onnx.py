"""ONNX export with KV cache, from a stage directory, through `torch.onnx.export(dynamo=True)`.

One graph serves prefill and decode. Names (documented in docs/EXPORT.md):
    inputs   input_ids        int64  (batch, sequence)
             attention_mask   int64  (batch, past_sequence + sequence)   1 = attend, 0 = padding
             position_ids     int64  (batch, sequence)
             past.{i}.key     float  (batch, kv_heads, past_sequence, head_dim)   (MLA: (batch, 1, past, kv_lora_rank))
             past.{i}.value   float  (batch, kv_heads, past_sequence, head_dim)   (MLA: (batch, 1, past, rope_dim))
    outputs  logits           float  (batch, sequence, vocab)
             present.{i}.key / present.{i}.value: the past with this call's sequence appended
Prefill passes past tensors with past_sequence = 0. The cache layout is read from the model itself (one forward
with use_cache), so pruned models (explicit head_dim, fewer layers) and DeepSeek-V3's compressed MLA cache need
no special case. MoE experts run through transformers' `batched_mm` implementation, which exports.
Quantized stages are rewritten afterwards from their stored metadata (export/onnx_quant.py), never re-quantized.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache

from dscompress.errors import DscompressError
from dscompress.export import gqa

OPSET = 21  # the default; DequantizeLinear with block_size (INT4) needs 21
OPSET_INT4 = 21
EXTERNAL_DATA_ABOVE = 2 * 1024**3 - (64 << 20)  # protobuf's 2 GB limit, with room for the graph itself


class ExportError(DscompressError):
    """A model or module that cannot be exported (exit 2)."""


@dataclass(frozen=True)
class CacheLayout:
    layers: int
    key: tuple[int, int]  # (heads, dim) per layer, batch and length excluded
    value: tuple[int, int]
    dtype: str

    def as_dict(self) -> dict:
        return asdict(self)


def cache_layout(model: nn.Module) -> CacheLayout:
    """The per-layer KV-cache shapes, from one short forward pass."""
    with torch.no_grad():
        out = model(torch.zeros(1, 2, dtype=torch.long), use_cache=True)
    layers = out.past_key_values.layers
    keys = {tuple(layer.keys.shape[1::2]) for layer in layers}
    values = {tuple(layer.values.shape[1::2]) for layer in layers}
    if len(keys) != 1 or len(values) != 1:
        raise ExportError(f"layers cache different shapes (keys {sorted(keys)}); one graph needs one layout")
    dtype = str(layers[0].keys.dtype).removeprefix("torch.")
    return CacheLayout(len(layers), keys.pop(), values.pop(), dtype)


class WithCache(nn.Module):
    """Flat tensors in and out around a causal LM with a DynamicCache (transformers 5 has no tuple caches)."""

    def __init__(self, model: nn.Module, layers: int):
        super().__init__()
        self.model, self.layers = model, layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.layers)])
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=cache, use_cache=True,
        )  # fmt: skip
        present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def io_names(layers: int) -> tuple[list[str], list[str]]:
    past = [f"past.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def example_inputs(layout: CacheLayout, batch: int = 2, seq: int = 3, past: int = 5) -> tuple:
    """Example tensors with every dynamic dimension above 1 (torch.export specializes 0 and 1)."""
    dtype = getattr(torch, layout.dtype)
    ids = torch.randint(0, 100, (batch, seq))
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    positions = torch.arange(past, past + seq).unsqueeze(0).expand(batch, -1).contiguous()
    caches = []
    for _ in range(layout.layers):
        caches.append(torch.randn(batch, layout.key[0], past, layout.key[1], dtype=dtype))
        caches.append(torch.randn(batch, layout.value[0], past, layout.value[1], dtype=dtype))
    return (ids, mask, positions, *caches)


def _dynamic_shapes(layers: int) -> tuple:
    batch, seq = torch.export.Dim("batch", max=1024), torch.export.Dim("sequence", max=1 << 17)
    past = torch.export.Dim("past_sequence", max=1 << 17)
    total = torch.export.Dim.AUTO  # past + sequence: a sum of two dims cannot be declared, export infers it
    cache = {0: batch, 2: past}
    return ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}, tuple([cache] * (2 * layers)))


def prepare_for_export(model: nn.Module) -> nn.Module:
    model = model.eval()
    model.config.use_cache = True
    if hasattr(model, "set_experts_implementation") and _has_experts(model):
        model.set_experts_implementation("batched_mm")
    return model


def _has_experts(model: nn.Module) -> bool:
    return any(type(m).__name__.endswith("Experts") for m in model.modules())


def export_float(model: nn.Module, target: Path, opset: int = OPSET, fused_attention: bool = False) -> dict:
    """Export `model` (float weights; quantized stages hold dequantized values) to `target` (.onnx).
    fused_attention: ONNX Runtime's GroupQueryAttention per layer (export/gqa.py; the caller checks
    gqa.refusal first), else attention as standard ONNX operators."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # registry chatter (torchvision ops absent)
    model = prepare_for_export(model)
    layout = cache_layout(model)
    inputs, outputs = io_names(layout.layers)
    wrapper = (gqa.GqaDecoder if fused_attention else WithCache)(model, layout.layers)
    table = gqa.translation_table() if fused_attention else None
    external = sum(p.numel() * p.element_size() for p in model.parameters()) > EXTERNAL_DATA_ABOVE
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper, example_inputs(layout), str(target), dynamo=True, opset_version=opset,
                input_names=inputs, output_names=outputs, dynamic_shapes=_dynamic_shapes(layout.layers),
                external_data=external, optimize=True, verbose=False, custom_translation_table=table,
            )  # fmt: skip
    except Exception as exc:
        raise ExportError(f"{type(model).__name__} could not be exported to ONNX: {_first_line(exc)}") from exc
    meta = {"layout": layout.as_dict(), "inputs": inputs, "outputs": outputs, "external_data": external,
            "opset": opset, "model_type": model.config.model_type,
            "attention": "GroupQueryAttention" if fused_attention else "onnx"}  # fmt: skip
    (target.parent / "export.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _first_line(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return text[:300]
