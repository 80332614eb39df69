"""Decode speed of the `ort-genai` target under ONNX Runtime GenAI itself, beside our `onnx-ort` export under our
own ONNX Runtime loop and the fp32 graph (in both), on 2 CPU threads: INT4 through our own graph and through ORT
GenAI's model builder (GroupQueryAttention, fused q/k/v; what `ort-genai` uses for INT4 stages), and what
MatMulNBits' `accuracy_level` 4 (int8 activations inside the INT4 kernel) costs in perplexity and gains in speed.

    python bench/bench_genai.py --stage out/run/1-int4 --baseline out/run/0-baseline --out bench/results/genai_cpu.json

Each graph is exported by dscompress from the same stage; decode is the median over `--reps` greedy runs of
`--new-tokens` tokens after a `--prompt-len`-token prompt (ORT GenAI's time per generated token, ours from the
same KV-cache loop `dscompress generate` uses). Perplexity is on held-out pydoc windows through ONNX Runtime.
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
from dscompress.export import bundle_runner, stage_export
from dscompress.export.genai import CONFIG_FILE
from dscompress.export.ort_runner import OrtLM
from dscompress.export.stage_export import export_stage
from dscompress.models.load import load_model, load_tokenizer


def genai_decode_ms(directory: Path, prompt: list[int], new_tokens: int, threads: int) -> float:
    import onnxruntime_genai as og

    config = json.loads((directory / CONFIG_FILE).read_text())
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    model = og.Model(str(directory))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, min_length=len(prompt) + new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    generator.generate_next_token()  # the first token comes from the prefill
    started, n = time.perf_counter(), 0
    while not generator.is_done():
        generator.generate_next_token()
        n += 1
    return (time.perf_counter() - started) / max(n, 1) * 1000


RUNS = [  # label, target, which stage, accuracy_level, graph ("ours" forces our own graph for ort-genai)
    ("fp32 onnx-ort", "onnx-ort", "baseline", 0, "ours"),
    ("fp32 ort-genai", "ort-genai", "baseline", 0, "ours"),
    ("onnx-ort int4", "onnx-ort", "stage", 0, "ours"),
    ("ort-genai int4, our graph", "ort-genai", "stage", 0, "ours"),
    ("ort-genai int4, builder graph", "ort-genai", "stage", 0, "builder"),
    ("ort-genai int4, builder graph, accuracy_level 4", "ort-genai", "stage", 4, "builder"),
]


def export(stage: Path, target: str, out: Path, level: int, graph: str) -> dict:
    """Our export; for graph "ours" on an INT4 stage, the builder route is switched off for the comparison."""
    if out.exists():
        shutil.rmtree(out)
    refusal = stage_export.builder_refusal
    if graph == "ours":
        stage_export.builder_refusal = lambda *_: "bench: our own graph"
    try:
        return export_stage(stage, target, out, accuracy_level=level)
    finally:
        stage_export.builder_refusal = refusal


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=Path, required=True, help="a quantized (INT4) stage directory")
    ap.add_argument("--baseline", type=Path, required=True, help="the float stage (fp32 row)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-genai"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3, help="interleaved rounds over every row; the median is kept")
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.stage)
    spec = DataSpec(eval=SplitSpec(samples=args.eval_windows, seq_len=256))
    windows = Corpus(spec, tok).windows("eval").numpy()
    prompt = windows[0, : args.prompt_len].tolist()
    rows, lms = [], {}
    for label, target, which, level, graph in RUNS:
        out = args.work / label.replace(" ", "_").replace(",", "")
        meta = export(args.baseline if which == "baseline" else args.stage, target, out, level, graph)
        lms[label] = (OrtLM(out, threads=args.threads, exact_qdq=False), out)
        ppl = bundle_runner.perplexity(lms[label][0].gen, windows.astype(np.int64))
        rows.append({"label": label, "target": target, "graph": meta.get("graph", "dscompress"),
                     "accuracy_level": level, "threads": args.threads, "ours": [], "genai": [],
                     "perplexity": round(ppl, 4)})  # fmt: skip
    for _ in range(args.reps):  # interleaved: every row once per round
        for row in rows:
            lm, out = lms[row["label"]]
            row["ours"].append(lm.greedy(torch.tensor(prompt), args.new_tokens)[1]["decode_ms_per_token"])
            if row["target"] == "ort-genai":
                row["genai"].append(genai_decode_ms(out, prompt, args.new_tokens, args.threads))
    for row in rows:
        row["our_loop_decode_ms_per_token"] = round(statistics.median(row.pop("ours")), 2)
        times = row.pop("genai")
        if times:
            row["genai_decode_ms_per_token"] = round(statistics.median(times), 2)
        print(json.dumps(row), flush=True)
    fp32_ours, fp32_genai = rows[0]["our_loop_decode_ms_per_token"], rows[1]["genai_decode_ms_per_token"]
    for row in rows:
        row["speedup_vs_fp32_our_loop"] = round(
            fp32_ours / row.get("genai_decode_ms_per_token", row["our_loop_decode_ms_per_token"]), 2
        )
        if "genai_decode_ms_per_token" in row:
            row["speedup_vs_fp32_under_genai"] = round(fp32_genai / row["genai_decode_ms_per_token"], 2)
    torch_ppl = bundle_runner.perplexity(_TorchGen(args.stage), windows.astype(np.int64))
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} {os.cpu_count()} cores (CPU)",
            "command": " ".join(sys.argv), "stage": str(args.stage), "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens, "reps": args.reps, "eval_windows": f"{args.eval_windows} x 256",
            "torch_stage_perplexity": round(torch_ppl, 4)}  # fmt: skip
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


class _TorchGen:
    """The torch stage behind bundle_runner.perplexity's `step` protocol (the ONNX rows' reference)."""

    def __init__(self, stage: Path):
        self.model = load_model(stage).eval()

    def empty_past(self, batch: int) -> None:
        return None

    def step(self, ids, past, start):
        with torch.no_grad():
            return self.model(torch.from_numpy(ids)).logits.numpy(), None


if __name__ == "__main__":
    main()
