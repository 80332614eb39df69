"""Decode speed of the `ort-genai` target under ONNX Runtime GenAI itself, beside our `onnx-ort` export under our
own ONNX Runtime loop and the fp32 graph, on 2 CPU threads; and what MatMulNBits' `accuracy_level` 4 (int8
activations inside the INT4 kernel) costs in perplexity and gains in speed.

    python bench/bench_genai.py --stage out/run/1-int4 --baseline out/run/0-baseline --out bench/results/genai_cpu.json

Each graph is exported by dscompress from the same stage; decode is the median over `--reps` greedy runs of
`--new-tokens` tokens after a `--prompt-len`-token prompt (ORT GenAI's time per generated token, ours from the
same KV-cache loop `dscompress generate` uses). Perplexity is on held-out pydoc windows through ONNX Runtime.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from dscompress.calibrate.data import Corpus
from dscompress.calibrate.spec import DataSpec, SplitSpec
from dscompress.export import bundle_runner
from dscompress.export.genai import CONFIG_FILE
from dscompress.export.ort_runner import OrtLM
from dscompress.export.stage_export import export_stage
from dscompress.models.load import load_tokenizer


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=Path, required=True, help="a quantized (INT4) stage directory")
    ap.add_argument("--baseline", type=Path, required=True, help="the float stage (fp32 row)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-genai"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.stage)
    spec = DataSpec(eval=SplitSpec(samples=args.eval_windows, seq_len=256))
    windows = Corpus(spec, tok).windows("eval").numpy()
    prompt = windows[0, : args.prompt_len].tolist()
    runs = [("fp32", "onnx-ort", args.baseline, 0), ("onnx-ort int4", "onnx-ort", args.stage, 0),
            ("onnx-ort int4, accuracy_level 4", "onnx-ort", args.stage, 4),
            ("ort-genai int4", "ort-genai", args.stage, 0),
            ("ort-genai int4, accuracy_level 4", "ort-genai", args.stage, 4)]  # fmt: skip
    rows = []
    for label, target, stage, level in runs:
        out = args.work / label.replace(" ", "_").replace(",", "")
        export_stage(stage, target, out, accuracy_level=level)
        lm = OrtLM(out, threads=args.threads, exact_qdq=False)
        ours = statistics.median(lm.greedy(torch.tensor(prompt), args.new_tokens)[1]["decode_ms_per_token"]
                                 for _ in range(args.reps))  # fmt: skip
        row = {"label": label, "target": target, "accuracy_level": level, "threads": args.threads,
               "our_loop_decode_ms_per_token": round(ours, 2),
               "perplexity": round(bundle_runner.perplexity(lm.gen, windows.astype(np.int64)), 4)}  # fmt: skip
        if target == "ort-genai":
            row["genai_decode_ms_per_token"] = round(statistics.median(
                genai_decode_ms(out, prompt, args.new_tokens, args.threads) for _ in range(args.reps)), 2)  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
    fp32 = rows[0]["our_loop_decode_ms_per_token"]
    for row in rows:
        row["speedup_vs_fp32"] = round(
            fp32 / row.get("genai_decode_ms_per_token", row["our_loop_decode_ms_per_token"]), 2
        )
    meta = {"date": time.strftime("%Y-%m-%d"), "stage": str(args.stage), "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens, "reps": args.reps, "eval_windows": f"{args.eval_windows} x 256"}  # fmt: skip
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
