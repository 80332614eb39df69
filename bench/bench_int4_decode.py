"""INT4 decode speed of the `onnx-ort` target against fp32 ONNX (issue #19), on 2 CPU threads, with the perplexity
and KL each graph computes in ONNX Runtime beside the torch stage's perplexity on the same windows.

    python bench/bench_int4_decode.py --baseline out/run/0-baseline --stage gptq=out/run/1-w4 \
        --stage mixed=out/mixed/1-w4 --group-size 64 --out bench/results/int4_accuracy.json

Every stage is exported by dscompress' onnx-ort exporter as it ships (GroupQueryAttention, fused sibling
MatMulNBits); the fp32 baseline is exported twice, with that graph and with standard ONNX attention (`--plain`:
the graph before GroupQueryAttention), so both ratios are on record. Decode is the median over `--reps`
interleaved rounds of greedy runs of `--new-tokens` tokens after a `--prompt-len`-token prompt, through the
KV-cache loop `dscompress generate` uses. The torch stage's perplexity is the stage's own (a stage with
`activations: int8` quantizes its activations as MatMulNBits does at accuracy_level 4, which its export uses).
Rows are appended to --out with the fields of int4_accuracy.json (model, tool, method, group_size, split, ppl,
baseline_ppl, kl) plus decode_ms_per_token and fp32_decode_ms_per_token.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dscompress.calibrate.data import Corpus
from dscompress.calibrate.spec import DataSpec, SplitSpec
from dscompress.export import gqa, stage_export
from dscompress.export.ort_runner import OrtLM
from dscompress.models.load import load_model, load_tokenizer
from dscompress.quant.actquant import attach_saved


def export(stage: Path, out: Path, plain: bool = False, level: int | None = None) -> dict:
    if out.exists():
        shutil.rmtree(out)
    refusal = gqa.refusal
    if plain:
        gqa.refusal = lambda *_: "bench: standard ONNX attention"
    try:
        return stage_export.export_stage(stage, "onnx-ort", out, accuracy_level=level)
    finally:
        gqa.refusal = refusal


def scores(logits_of, windows: np.ndarray, reference: list[np.ndarray] | None) -> tuple[float, float, list]:
    """(perplexity, KL to `reference`'s distributions, this model's log-probs per window)."""
    nll, kl, count, logps = 0.0, 0.0, 0, []
    for i, window in enumerate(windows):
        logp = torch.log_softmax(torch.as_tensor(logits_of(window[None])[0, :-1]).float(), -1)
        nll -= float(logp.gather(-1, torch.as_tensor(window[1:, None], dtype=torch.long)).sum())
        if reference is not None:
            ref = torch.as_tensor(reference[i])
            kl += float((ref.exp() * (ref - logp)).sum())
        count += len(window) - 1
        logps.append(logp.numpy())
    return float(np.exp(nll / count)), kl / count, logps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", type=Path, required=True)
    ap.add_argument("--stage", action="append", required=True,
                    help="label=stage directory[@accuracy_level] (repeatable)")  # fmt: skip
    ap.add_argument("--model", default="bundled:smollm2-135m-instruct", help="the rows' model name")
    ap.add_argument("--group-size", type=int, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-int4-decode"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    windows = Corpus(DataSpec(eval=SplitSpec(samples=args.eval_windows, seq_len=256)), load_tokenizer(args.baseline))
    windows = windows.windows("eval").numpy().astype(np.int64)
    graphs = [("fp32", args.baseline, False, None), ("fp32, standard attention", args.baseline, True, None)]
    for spec in args.stage:
        label, path = spec.split("=", 1)
        path, _, level = path.partition("@")
        graphs.append((label, Path(path), False, int(level) if level else None))
    rows, lms, reference = [], {}, None
    for label, stage, plain, level in graphs:
        out = args.work / label.replace(" ", "_").replace(",", "")
        meta = export(stage, out, plain, level)
        lm = lms[label] = OrtLM(out, threads=args.threads, exact_qdq=False)
        ppl, kl, logps = scores(lambda w, lm=lm: lm.logits(torch.as_tensor(w)).numpy(), windows, reference)
        reference = reference or logps
        model = load_model(stage).eval()
        attach_saved(model, stage)  # a stage with activations: int8 computes them as the kernel does
        with torch.no_grad():
            torch_ppl = scores(lambda w, m=model: m(torch.as_tensor(w)).logits.numpy(), windows, None)[0]
        fused = (meta.get("quantization") or {}).get("fused_matmulnbits", 0)
        rows.append({"label": label, "attention": meta.get("attention"), "ppl": ppl, "kl": kl,
                     "accuracy_level": meta.get("accuracy_level", 0), "torch_ppl": torch_ppl,
                     "fused_matmulnbits": fused, "ms": []})  # fmt: skip
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "ms"}), flush=True)
    prompt = torch.as_tensor(windows[0, : args.prompt_len])
    for _ in range(args.reps):  # interleaved: every graph once per round
        for row in rows:
            row["ms"].append(lms[row["label"]].greedy(prompt, args.new_tokens)[1]["decode_ms_per_token"])
    _save(args, rows)


def _cpu() -> str:
    """The CPU's model name and the instruction sets MatMulNBits' kernels choose between."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return f"{name}, {' '.join(isa) or platform.machine()}"


def _save(args, rows: list[dict]) -> None:
    fp32 = statistics.median(rows[0]["ms"])
    common = {"model": args.model, "tool": "dscompress", "group_size": args.group_size, "split": "pydoc",
              "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} {os.cpu_count()} cores (CPU: {_cpu()})",
              "command": " ".join(sys.argv), "threads": args.threads, "eval_windows": f"{args.eval_windows} x 256",
              "runtime": "onnx-ort (ONNX Runtime, our KV-cache loop)",
              "baseline_ppl": round(rows[0]["ppl"], 4), "fp32_decode_ms_per_token": round(fp32, 2)}  # fmt: skip
    out = []
    for row in rows:
        ms = statistics.median(row["ms"])
        out.append({**common, "method": row["label"], "ppl": round(row["ppl"], 4), "kl": round(row["kl"], 5),
                    "torch_stage_ppl": round(row["torch_ppl"], 4), "attention": row["attention"],
                    "accuracy_level": row["accuracy_level"],
                    "fused_matmulnbits": row["fused_matmulnbits"], "decode_ms_per_token": round(ms, 2),
                    "decode_ms_rounds": [round(m, 2) for m in row["ms"]],
                    "speedup_vs_fp32": round(fp32 / ms, 2)})  # fmt: skip
        print(json.dumps({k: out[-1][k] for k in ("method", "ppl", "torch_stage_ppl", "kl", "decode_ms_per_token",
                                                   "speedup_vs_fp32")}))  # fmt: skip
    existing = json.loads(args.out.read_text()) if args.out.exists() else []
    tmp = args.out.with_name(f".tmp-{args.out.name}")
    tmp.write_text(json.dumps(existing + out, indent=2) + "\n")
    tmp.replace(args.out)


if __name__ == "__main__":
    main()
