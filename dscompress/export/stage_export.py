"""Export a stage directory to an ONNX target and check the result against the stage itself.

    <stage>/onnx/<target>/model.onnx (+ model.onnx.data above 2 GB), export.json, tokenizer files

`parity` runs ONNX Runtime over the pipeline's evaluation windows and compares perplexity, KL to the baseline and
top-1 with the torch artifact; for unquantized exports it also requires the same greedy tokens as torch and
reports the max |logit difference|.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import warnings
from pathlib import Path

import onnx
import torch

from dscompress.artifact import ONNX_SIDE_FILES
from dscompress.calibrate.metrics import evaluate
from dscompress.export import gqa, trt_rules
from dscompress.export.genai import PAST, check_genai, rename_cache, write_config
from dscompress.export.genai_builder import build, builder_refusal
from dscompress.export.nbits_fuse import fuse_siblings
from dscompress.export.onnx import EXTERNAL_DATA_ABOVE, OPSET, ExportError, export_float
from dscompress.export.onnx_quant import ORT_TARGETS, TARGETS, check_exportable, quantize_graph
from dscompress.export.ort_runner import MODEL_FILE, OrtLM, torch_greedy
from dscompress.gates import Verdict, greedy_verdict, parity_verdicts
from dscompress.models.load import load_model
from dscompress.quant.qstate import QuantState

# MatMulNBits' accuracy_level for the ONNX Runtime targets unless asked otherwise: 0 keeps the float-activation
# arithmetic the stage computed. Level 4 (int8 activations) is what a stage with `activations: int8` computes, and
# is then always used; its speed depends on the CPU (docs/BENCHMARKS.md: no faster on an AVX2 EPYC at 2026-11-30,
# 1.75x faster per token on an AVX-512 VNNI Xeon at 2026-12-02).
ACCURACY_LEVEL = 0


def export_stage(stage: Path, target: str, out: Path, fp16: bool = False, opset: int = OPSET,
                 accuracy_level: int | None = None) -> dict:  # fmt: skip
    """Write `target` for the checkpoint in `stage` into `out`; returns export.json's content. accuracy_level:
    MatMulNBits' for the ONNX Runtime targets (None: 4 for a stage with int8 activations, else ACCURACY_LEVEL)."""
    if target not in TARGETS:
        raise ExportError(f"unknown ONNX target {target!r}; allowed: {', '.join(TARGETS)}")
    if (fp16 or accuracy_level is not None) and target not in ORT_TARGETS:
        raise ExportError("fp16 and accuracy_level are options of the ONNX Runtime targets (onnx-ort, ort-genai); "
                          "the onnx target keeps float32 around its Q/DQ nodes")  # fmt: skip
    quant = QuantState.load(stage)
    check_exportable(quant, target, opset)  # from quantization.json alone, before minutes of exporting
    accuracy_level = _accuracy_level(quant, target, accuracy_level)
    if fp16 and quant is not None and quant.dynamic_activations:
        raise ExportError("fp16 does not apply to dynamic int8 activations (their scales and codes are computed in "
                          "float32 beside the int8 MatMuls); export without --fp16")  # fmt: skip
    if target == "ort-genai":
        check_genai(stage)
        if not fp16 and builder_refusal(stage, quant) is None:  # INT4: ORT GenAI's own builder, on our grid
            out.mkdir(parents=True, exist_ok=True)
            meta = build(stage, quant, out, accuracy_level)
            meta |= {"target": target, "fp16": False, "method": quant.method, "tensorrt_rules": "n/a",
                     "accuracy_level": accuracy_level}  # fmt: skip
            return _finish(stage, out, meta)
    model = load_model(stage).eval()
    out.mkdir(parents=True, exist_ok=True)
    path = out / MODEL_FILE
    plain = gqa.refusal(model) if target == "onnx-ort" else f"the {target} target keeps standard attention"
    meta = export_float(model, path, opset, fused_attention=plain is None)
    if plain is not None:
        meta["attention_plain_because"] = plain
    proto = onnx.load(str(path))
    counts = quantize_graph(proto, model, quant, target, accuracy_level) if quant is not None else {}
    if quant is not None and counts["quantized_linears"] != counts["expected_linears"]:
        raise ExportError(
            f"matched {counts['quantized_linears']} of {counts['expected_linears']} quantized Linears in the graph"
        )
    if quant is not None and target in ORT_TARGETS:
        counts["fused_matmulnbits"] = fuse_siblings(proto)  # q/k/v and gate/up: one MatMulNBits each
    external = meta["external_data"] or proto.ByteSize() > EXTERNAL_DATA_ABOVE
    _save(proto, path, external)
    onnx.checker.check_model(str(path))  # the standard graph; MatMulNBits' custom domain is skipped
    onnx.shape_inference.infer_shapes_path(str(path), str(out / ".inferred.onnx"))
    (out / ".inferred.onnx").unlink()
    fused = {}
    if target in ORT_TARGETS:  # ORT-only operators from here on: ONNX Runtime itself validates them (parity)
        proto, fused = ort_fusions(path)
        if fp16:
            from onnxruntime.transformers.float16 import convert_float_to_float16

            proto = convert_float_to_float16(
                proto, keep_io_types=False, op_block_list=["MatMulNBits"], disable_shape_infer=True
            )
        if target == "ort-genai":  # the cache under the names ORT GenAI and optimum use
            meta["inputs"] = rename_cache(proto, meta["layout"]["layers"])
            meta["past_name"] = PAST
        _save(proto, path, external)
    unloaded = onnx.load(str(path), load_external_data=False) if target == "onnx" else None
    problems = trt_rules.check(unloaded, str(path.parent)) if unloaded is not None else []
    if problems:
        raise ExportError(f"the onnx target breaks TensorRT's rules ({len(problems)} problems): {problems[0]}")
    meta |= {
        "target": target,
        "fp16": fp16,
        "external_data": external,
        "quantization": counts,
        "method": quant.method if quant else None,
        "tensorrt_rules": "passed" if target == "onnx" else "n/a",
        "ort_fusions": fused,
        "accuracy_level": accuracy_level,
    }
    if target == "ort-genai":
        write_config(out, stage, meta, max_length=2048)
    meta["graph"] = "dscompress (torch.onnx dynamo export)"
    return _finish(stage, out, meta)


def _accuracy_level(quant: QuantState | None, target: str, asked: int | None) -> int:
    """MatMulNBits' accuracy_level: 4 for a stage that computes int8 activations per block (it is that
    arithmetic), else what was asked, else ACCURACY_LEVEL."""
    if quant is not None and quant.block_activations:
        if asked not in (None, 4):
            raise ExportError(
                f"accuracy_level {asked}: this stage quantizes activations to int8 per block (activations: int8), "
                "which is MatMulNBits at accuracy_level 4; another level computes a different model. Fix: drop "
                "accuracy_level (4 is used), or re-run the stage with activations: float"
            )
        return 4
    if asked is None:
        return ACCURACY_LEVEL if target in ORT_TARGETS else 0
    return asked


def _finish(stage: Path, out: Path, meta: dict) -> dict:
    (out / "export.json").write_text(json.dumps(meta, indent=2) + "\n")
    for name in ONNX_SIDE_FILES:
        if (stage / name).exists():
            shutil.copy2(stage / name, out / name)
    return meta


# The dynamo exporter records each node's Python stack trace, with absolute paths of the machine that exported it:
# dropped, so that the same stage exports to the same bytes from any checkout (and no local path leaks out).
STACK_TRACE = "pkg.torch.onnx.stack_trace"


def _save(proto: onnx.ModelProto, path: Path, external: bool) -> None:
    for node in (*proto.graph.node, *(n for f in proto.functions for n in f.node)):
        kept = [p for p in node.metadata_props if p.key != STACK_TRACE]
        if len(kept) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(kept)
    for stale in path.parent.glob(f"{path.name}*"):
        stale.unlink()
    onnx.save_model(proto, str(path), save_as_external_data=external, location=f"{path.name}.data")


def ort_fusions(path: Path) -> tuple[onnx.ModelProto, dict]:
    """ONNX Runtime's transformer fusions where they apply (opt_level 0: its Python fusions only, so the file stays
    portable across execution providers). On our graphs RMSNorm and residual adds fuse into
    (Skip)SimplifiedLayerNormalization; its attention and rotary patterns do not match the dynamo export."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)  # fusion-by-fusion chatter
    options = FusionOptions("gpt2")
    # Our models gate with SiLU, never GELU; and ORT's QuickGelu matcher (1.32) calls .item() on whatever feeds
    # a Sigmoid through a Mul, which fails when that Mul scales by a per-token tensor (dynamic int8's gate_proj).
    options.enable_gelu = False
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            optimized = optimize_model(
                onnx.load(str(path)), model_type="gpt2", num_heads=0, hidden_size=0, opt_level=0,
                optimization_options=options,
            )  # fmt: skip
        except RuntimeError as exc:  # an optimization only: DeepSeek-V3's MLA graph breaks its topological sort
            logging.getLogger(__name__).warning("ONNX Runtime's fusions skipped: %s", exc)
            return onnx.load(str(path)), {"skipped": 1}  # the graph as exported, not a half-fused one
    stats = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
    model = optimized.model
    if any(n.domain == "com.microsoft" for n in model.graph.node) and not any(
        o.domain == "com.microsoft" for o in model.opset_import
    ):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return model, stats


# What each target's gate measures: the runtime it deploys on. `onnx` is for TensorRT, whose INT8 arithmetic is
# the graph's Q/DQ taken literally (ONNX Runtime with Q/DQ fusion off computes the same); `onnx-ort` is for ONNX
# Runtime itself, with its default session (Q/DQ pairs fused into its integer kernels).
DEPLOYS_ON = {
    "onnx": "exact Q/DQ, as TensorRT computes it",
    "onnx-ort": "default ONNX Runtime session",
    "ort-genai": "default ONNX Runtime session (the one ONNX Runtime GenAI opens on this graph)",
}


def parity(
    stage: Path, onnx_dir: Path, windows, ref, torch_metrics: dict, tolerance, batch_size: int
) -> tuple[dict, list[Verdict]]:
    """ONNX Runtime's metrics on the evaluation windows, in the session the target deploys on (DEPLOYS_ON), and the
    verdicts against `tolerance` (gates.OnnxParity). A quantized `onnx` export also reports what a default ORT
    session computes on the same graph (`default_session`), which is what ORT applications would see."""
    target = json.loads((onnx_dir / "export.json").read_text())["target"]
    exact = target == "onnx"
    lm = OrtLM(onnx_dir, exact_qdq=exact)
    metrics = evaluate(lm, windows, ref, batch_size, torch.device("cpu"))
    metrics["session"] = DEPLOYS_ON[target]
    quantized = QuantState.load(stage) is not None
    if exact and quantized:
        default = evaluate(OrtLM(onnx_dir, exact_qdq=False), windows, ref, batch_size, torch.device("cpu"))
        metrics["default_session"] = default | {"session": DEPLOYS_ON["onnx-ort"], "gated": False}
    verdicts = parity_verdicts(onnx_dir.name, metrics, torch_metrics, tolerance)
    if not quantized and tolerance.greedy_prompts:
        metrics["greedy"] = _greedy_check(stage, lm, windows, tolerance)
        verdicts.append(greedy_verdict(onnx_dir.name, metrics["greedy"], tolerance))
    return metrics, verdicts


def _greedy_check(stage: Path, lm: OrtLM, windows, tolerance) -> dict:
    model = load_model(stage).eval()
    identical, max_diff = 0, 0.0
    for row in windows[: tolerance.greedy_prompts]:
        prompt = row[:16]
        ours, _ = lm.greedy(prompt, tolerance.greedy_tokens)
        identical += int(ours == torch_greedy(model, prompt, tolerance.greedy_tokens))
        with torch.no_grad():
            max_diff = max(max_diff, float((lm.logits(row[None]) - model(row[None]).logits).abs().max()))
    return {"identical_prompts": identical, "max_logit_diff": max_diff, "tokens": tolerance.greedy_tokens}
