"""The `ort-genai` graph of an INT4 weight-only stage, written by ONNX Runtime GenAI's own model builder
(`python -m onnxruntime_genai.models.builder`) from our packed GPTQ checkpoint.

The builder emits what ORT GenAI runs fastest on a CPU: GroupQueryAttention with its rotary embedding inside
(over a cache buffer ORT GenAI preallocates: `past_present_share_buffer: true`), q/k/v fused into one MatMulNBits,
and RMSNorm with the residual add fused (SkipSimplifiedLayerNormalization). It reads the checkpoint's own INT4
grid (qweight / scales / qzeros) rather than re-quantizing, so the stage's codes survive; measured on SmolLM2 W4
g64: KL 2.6e-6 between its graph and ours at `accuracy_level` 0 (docs/BENCHMARKS.md, "ORT GenAI's builder").
It is a well-kept library that tracks ORT GenAI's operators, so we drive it rather than re-create its fusions.
Kept in float as in the stage: the embedding and lm_head (`nodes_to_exclude`; the builder would otherwise RTN
them to 4 bits) and the tie between them (`shared_embeddings=false`).

Used for stages it reads exactly: 4-bit weight-only (gptq / rtn grids), dense Llama / Qwen2 / Qwen3, embedding and
lm_head unquantized. Everything else (float and INT8 stages, MoE experts, a quantized lm_head) keeps our own graph
(export/genai.py). The parity gate runs on the builder's graph in a default ONNX Runtime session.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import onnx

from dscompress.atomic import TMP_PREFIX
from dscompress.export.genai import PAST
from dscompress.export.onnx import ExportError
from dscompress.quant.qstate import QuantState

BUILDER_TYPES = ("llama", "qwen2", "qwen3")
FLOAT_NODES = "/lm_head/MatMul,/model/embed_tokens/Gather"


def builder_refusal(stage: Path, quant: QuantState | None) -> str | None:
    """Why the builder cannot write this stage exactly (None: it can)."""
    model_type = json.loads((stage / "config.json").read_text()).get("model_type")
    if quant is None or quant.bits != 4 or quant.activations:
        return "not a 4-bit weight-only stage"
    if quant.mixed:
        return "mixed bits (bits_budget): the builder reads one bit width"
    if model_type not in BUILDER_TYPES:
        return f"the builder route covers {', '.join(BUILDER_TYPES)}, not {model_type}"
    if any(meta["kind"] != "linear" for meta in quant.targets.values()):
        return "MoE expert stacks"
    if any(name.endswith(("lm_head", "embed_tokens")) for name in quant.targets):
        return "a quantized lm_head or embedding (the builder would re-quantize it)"
    return None


def build(stage: Path, quant: QuantState, out: Path, accuracy_level: int) -> dict:
    """The builder's graph, genai_config.json and tokenizer in `out` for `stage` (whose quantization metadata is
    `quant`); returns the export metadata (export.json)."""
    from dscompress.export.formats import export as pack

    if importlib.util.find_spec("onnxruntime_genai") is None:
        raise ExportError(
            "the ort-genai target writes INT4 stages with ONNX Runtime GenAI's model builder, and onnxruntime-genai "
            "is not installed; install the onnx extra: pip install 'dscompress[onnx]'"
        )
    scratch = out.with_name(f"{TMP_PREFIX}builder-{out.name}.{os.getpid()}")
    try:
        pack(stage, scratch / "gptq", "gptq")
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(scratch / "gptq"), "-o", str(out),
               "-p", "int4", "-e", "cpu", "-c", str(scratch / "cache"), "--extra_options", "shared_embeddings=false",
               f"nodes_to_exclude={FLOAT_NODES}", f"accuracy_level={accuracy_level}"]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise ExportError(f"ONNX Runtime GenAI's model builder failed on {stage}: {last[:300]}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return _meta(stage, out, quant)


def _meta(stage: Path, out: Path, quant: QuantState) -> dict:
    import onnxruntime_genai

    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    ops = Counter(n.op_type for n in proto.graph.node)
    if ops["MatMul"] > 1:  # lm_head only: every other MatMul must have come out of our grid as MatMulNBits
        raise ExportError(f"ONNX Runtime GenAI's model builder left {ops['MatMul']} float MatMuls in the graph")
    text = json.loads((stage / "config.json").read_text())
    text = text.get("text_config", text)
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    cache = [text["num_key_value_heads"], head_dim]
    return {
        "layout": {"layers": text["num_hidden_layers"], "key": cache, "value": cache, "dtype": "float32"},
        "inputs": [v.name for v in proto.graph.input],
        "outputs": [v.name for v in proto.graph.output],
        "past_name": PAST,
        "external_data": (out / "model.onnx.data").exists(),
        "graph": f"onnxruntime-genai {onnxruntime_genai.__version__} model builder",
        # the stage's quantized Linears, and the builder's nodes for them (q/k/v fused into one MatMulNBits)
        "quantization": {"quantized_linears": len(quant.targets), "matmulnbits": ops["MatMulNBits"],
                         "group_query_attention": ops["GroupQueryAttention"]},
        "ort_fusions": {k: ops[k] for k in ("GroupQueryAttention", "SkipSimplifiedLayerNormalization") if ops[k]},
    }  # fmt: skip
