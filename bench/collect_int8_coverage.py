"""Issue #18's `bench/results/int8_coverage.json`: every INT8 row the benches measured, ours and the peers', in one
list with the W8A8 share counted the same way: the share of the decoder layers' Linear multiply-adds that run
with int8 weights and int8 activations (lm_head and embeddings are outside the decoder layers).

Sources (each row keeps its file, date, machine and command):
- bench/results/int8_cpu*.json (bench_int8_cpu.py): dynamic per-token rows in ONNX Runtime, with decode speed on
  the machine's cores (2 here) against fp32 ONNX in the same run, and ONNX Runtime's quantize_dynamic beside them;
- bench/results/w8a8*.json (bench_w8a8.py): static W8A8 rows (ours with its fallback, modelopt, ONNX Runtime's
  static quantizer) and llm-compressor's dynamic W8A8, accuracy only (PyTorch fake quantization or ORT Q/DQ).

The benches store the share over every Linear (lm_head included), or, for our static rows, the pass summary's
decoder share (`w8a8_decoder_flops_share`, older rows only the Linear share). The decoder share is derived from the
model's config: decoder = (linear - lm_head part) / decoder fraction, where lm_head counts only when it ran in
int8 (our `-lmhead` variants, and ONNX Runtime's quantize_dynamic, which quantizes every MatMul). The peers'
static and dynamic W8A8 quantize every decoder Linear (their configurations' documented scope): share 1.

    .venv/bin/python bench/collect_int8_coverage.py            # writes bench/results/int8_coverage.json
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEFAULT_MODEL = "bundled:smollm2-135m-instruct"  # bench_w8a8's default --model
MODELS = {"smollm2": "bundled:smollm2-135m-instruct", "qwen": "bundled:qwen2.5-coder-0.5b-instruct"}


@cache
def decoder_fraction(model: str) -> float:
    """Decoder-layer Linear multiply-adds per token over all Linear multiply-adds (lm_head included)."""
    from dscompress.models.sources import resolve  # noqa: PLC0415 (heavy import, only when collecting)

    c = json.loads((resolve(model).directory / "config.json").read_text())
    h, heads, kv = c["hidden_size"], c["num_attention_heads"], c.get("num_key_value_heads", c["num_attention_heads"])
    head_dim = c.get("head_dim") or h // heads
    attn = h * heads * head_dim * 2 + h * kv * head_dim * 2  # q, o; k, v
    decoder = c["num_hidden_layers"] * (attn + 3 * h * c["intermediate_size"])
    return decoder / (decoder + h * c["vocab_size"])


def _model_of(doc: dict, row: dict) -> str:
    name = row.get("model") or doc.get("model")
    if not name and (m := re.search(r"--model (\S+)", doc.get("command", ""))):
        name = m.group(1)
    name = name or DEFAULT_MODEL
    # a bench run on another machine names the bundled model's GGUF by its path there (e.g. /root/g/smollm2.gguf)
    return next((full for key, full in MODELS.items() if key in name.lower()), name)


def _threads(machine: str) -> int | None:
    m = re.search(r"(\d+) cores", machine)
    return int(m.group(1)) if m else None


def _decoder_share(linear: float, lm_head_int8: bool, fraction: float) -> float:
    head = (1 - fraction) if lm_head_int8 else 0.0
    return round(min(1.0, max(0.0, (linear - head) / fraction)), 4)


def dynamic_rows(path: Path) -> list[dict]:
    doc = json.loads(path.read_text())
    out = []
    for row in doc["rows"]:
        if row["variant"] == "fp32 onnx" or "perplexity" not in row:
            continue
        model = _model_of(doc, row)
        fraction = decoder_fraction(model)
        ours = row["tool"] == "dscompress"
        share = _decoder_share(row["w8a8_share"], row["method"].endswith("lmhead"), fraction) if ours else 1.0
        out.append({
            "model": model, "tool": row["tool"], "method": row.get("method") or row["variant"],
            "activations": "dynamic", "w8a8_share": share, "lm_head": "int8" if not ours or "lmhead" in
            row["method"] else "float", "runtime": "onnxruntime", "ppl": round(row["perplexity"], 4),
            "baseline_ppl": round(doc["baseline_torch"]["perplexity"], 4), "kl": round(row["kl"], 5),
            "top1": round(row["top1"], 4), "decode_ms_per_token": round(row["decode_ms_per_token"], 2),
            "fp32_decode_ms_per_token": round(row["fp32_decode_ms_per_token"], 2),
            "decode_speedup": round(row["fp32_decode_ms_per_token"] / row["decode_ms_per_token"], 3),
            "threads": _threads(doc["machine"]), **_source(path, doc),
        })  # fmt: skip
    return out


def static_rows(path: Path) -> list[dict]:
    doc = json.loads(path.read_text())
    out = []
    for row in doc["rows"]:
        if "perplexity" not in row:  # calibration-only rows and peers that gave no result
            continue
        model = _model_of(doc, row)
        fraction = decoder_fraction(model)
        summary = row.get("summary", {})
        if row["tool"] == "dscompress":
            share = summary.get("w8a8_decoder_flops_share")
            share = round(share, 4) if share is not None else _decoder_share(summary["w8a8_linear_flops_share"],
                                                                             False, fraction)  # fmt: skip
        else:
            share = 1.0
        dynamic = "dynamic" in row["method"]
        out.append({
            "model": model, "tool": row["tool"], "method": row["method"],
            "activations": "dynamic" if dynamic else "static", "w8a8_share": share,
            "runtime": "onnxruntime" if row["tool"] == "onnxruntime" else "pytorch (fake quantization)",
            "ppl": round(row["perplexity"], 4), "baseline_ppl": round(doc["baseline"]["perplexity"], 4),
            "kl": round(row["kl"], 5), "top1": round(row["top1"], 4) if "top1" in row else None,
            "fallback_sites": row.get("fallback_sites"), "device": doc.get("device"),
            "calibration_peak_above_model_gib": _above_model(row), **_source(path, doc),
        })  # fmt: skip
    return out


def _above_model(row: dict) -> float | None:
    if "peak_rss_gib" in row and "model_rss_gib" in row:
        return round(row["peak_rss_gib"] - row["model_rss_gib"], 3)
    return None


def _source(path: Path, doc: dict) -> dict:
    return {"source": f"bench/results/{path.name}", "date": doc["date"], "machine": doc["machine"],
            "command": doc["command"]}  # fmt: skip


def main() -> None:
    rows = []
    for path in sorted(RESULTS.glob("int8_cpu*.json")):
        rows += dynamic_rows(path)
    for path in sorted(RESULTS.glob("w8a8*.json")):
        rows += static_rows(path)
    out = RESULTS / "int8_coverage.json"
    tmp = out.with_name(f".tmp-{out.name}")
    tmp.write_text(json.dumps(rows, indent=1) + "\n")
    tmp.replace(out)
    fractions = {model: round(decoder_fraction(model), 4) for model in sorted({r["model"] for r in rows})}
    print(f"{len(rows)} rows -> {out}; decoder fractions: {fractions}")


if __name__ == "__main__":
    main()
