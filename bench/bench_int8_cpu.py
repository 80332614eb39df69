"""INT8 for CPUs through ONNX Runtime, on a bundled real model, in one script (issue #18, item 3 and 4):

- fp32 ONNX (our `onnx-ort` export of the baseline, KV cache);
- ours: the `int8` pass with `activations: dynamic` (per-token int8 activations computed at run time, int8
  per-channel weights), exported to `onnx-ort` (MatMulInteger on uint8 codes): with SmoothQuant 0.5, without it,
  with rotation (`rotate: true`: residual stream, V/O heads, online Hadamard on down_proj's input), each with and
  without lm_head in int8;
- the peer: ONNX Runtime's own `quantize_dynamic` (QInt8 weights, per tensor and per channel) run on the same fp32
  graph: per-tensor uint8 activations computed at run time (DynamicQuantizeLinear + MatMulInteger, which ORT fuses).
Every row is scored in ONNX Runtime on the same held-out pydoc windows (perplexity, KL to fp32 torch, top-1) and
timed by `dscompress bench` (prefill of 128 tokens, decode ms/token over 64 new tokens, median of 3, each model in
its own process, all cores of the machine: 2 in CI), in interleaved rounds (`--timing-rounds`, median kept).

    .venv/bin/python bench/bench_int8_cpu.py                 # SmolLM2, about 15 minutes on 2 cores
    .venv/bin/python bench/bench_int8_cpu.py --model qwen     # Qwen2.5-Coder-0.5B
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from dscompress.calibrate.metrics import BaselineRef, evaluate
from dscompress.export.benchmark import bench
from dscompress.export.ort_runner import OrtLM
from dscompress.export.stage_export import export_stage
from dscompress.recipe import load_recipe
from dscompress.runner import Runner

HERE = Path(__file__).resolve().parent
MODELS = {"smollm2": "bundled:smollm2-135m-instruct", "qwen": "bundled:qwen2.5-coder-0.5b-instruct"}
RECIPE = """
model: {{path: {model}}}
data: {{eval: {{samples: {eval_windows}, seq_len: 512}}, calibration: {{samples: 32, seq_len: 512}}}}
stages:
  - name: {name}
    int8: {{activations: dynamic, rotate: {rotate}, online_hadamard: {online}, smoothquant_alpha: {alpha},
            fallback: none, exclude: {exclude}}}
    onnx: {{targets: [onnx-ort]}}
output_dir: out
"""
VARIANTS = {  # name: (SmoothQuant alpha, exclude, rotate, online Hadamard on down_proj's input)
    "dyn-sq05-lmhead": ("0.5", "[embed_tokens]", "false", "true"),
    "dyn-sq05": ("0.5", "['(^|\\.)lm_head$', embed_tokens]", "false", "true"),
    "dyn-nosq-lmhead": ("null", "[embed_tokens]", "false", "true"),
    "dyn-rot-lmhead": ("null", "[embed_tokens]", "true", "true"),
    "dyn-rot": ("null", "['(^|\\.)lm_head$', embed_tokens]", "true", "true"),
    "dyn-rot-offline-lmhead": ("null", "[embed_tokens]", "true", "false"),
}


def run_variant(work: Path, model: str, name: str, eval_windows: int) -> tuple[Path, dict, Runner]:
    """One int8 stage from the baseline; returns (its onnx-ort folder, its report, the runner)."""
    alpha, exclude, rotate, online = VARIANTS[name]
    text = RECIPE.format(model=model, name=name, alpha=alpha, exclude=exclude, rotate=rotate, online=online,
                         eval_windows=eval_windows)  # fmt: skip
    (work / f"{name}.yaml").write_text(text)
    recipe, located = load_recipe(work / f"{name}.yaml")
    runner = Runner(recipe, work / f"{name}.yaml", work / name, located=located)
    report = runner.run()
    return work / name / f"1-{name}" / "onnx" / "onnx-ort", report, runner


def ort_quantize_dynamic(fp32_dir: Path, target: Path, per_channel: bool) -> float:
    """ONNX Runtime's quantize_dynamic (QInt8 weights) of our fp32 graph; returns its seconds."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    quantize_dynamic(
        str(fp32_dir / "model.onnx"), str(target / "model.onnx"), per_channel=per_channel,
        weight_type=QuantType.QInt8, use_external_data_format=(fp32_dir / "model.onnx.data").exists(),
    )  # fmt: skip
    seconds = time.perf_counter() - started
    for f in fp32_dir.iterdir():
        if f.is_file() and not f.name.startswith("model"):
            shutil.copy2(f, target / f.name)
    return seconds


def score(label: str, directory: Path, windows, ref, extra: dict) -> dict:
    metrics = evaluate(OrtLM(directory, exact_qdq=False), windows, ref, 2, torch.device("cpu"))
    gc.collect()  # the session and its arena go before the next one is made
    print(label, json.dumps({k: metrics[k] for k in ("perplexity", "kl", "top1")}), flush=True)
    return {"variant": label, "dir": directory, **extra, **metrics}


def time_rows(rows: list[dict], rounds: int) -> None:
    """`dscompress bench` of every row, `rounds` times in turn (fp32, ours, peers, fp32, ...), so that a slow
    spell of a shared machine hits every row alike; each row keeps the median of its rounds (each round itself
    the median of 3 runs)."""
    runs: dict[int, list[dict]] = {i: [] for i in range(len(rows))}
    for _ in range(rounds):
        for i, row in enumerate(rows):
            runs[i].append(bench([row["dir"]], prompt_len=128, new_tokens=64, repeats=3)[0])
    for i, row in enumerate(rows):
        timing = dict(runs[i][0])
        for key in ("prefill_s", "decode_ms_per_token"):
            timing[key] = statistics.median(r[key] for r in runs[i])
            timing[f"{key}_rounds"] = [round(r[key], 5) for r in runs[i]]
        timing["decode_tokens_per_s"] = 1000.0 / timing["decode_ms_per_token"]
        row.update(timing)
        print(row["variant"], f"decode {timing['decode_ms_per_token']:.2f} ms/token", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--timing-rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=HERE / ".work" / "int8_cpu")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "int8_cpu.json")
    args = ap.parse_args()
    work = args.work / args.model
    work.mkdir(parents=True, exist_ok=True)
    model = MODELS[args.model]
    ours, runner = {}, None
    for name in args.variants:
        started = time.perf_counter()
        directory, report, runner = run_variant(work, model, name, args.eval_windows)
        ours[name] = (directory, report, time.perf_counter() - started)
    runner_report = ours[args.variants[-1]][1]
    baseline = work / args.variants[-1] / "0-baseline"
    ref, windows = BaselineRef(baseline), runner.corpus.windows("eval")
    del runner  # Qwen on 24 GiB: the last runner's models and ORT's grown arenas got the run OOM-killed once
    gc.collect()
    fp32 = work / "fp32"
    export_stage(baseline, "onnx-ort", fp32)
    rows = [score("fp32 onnx", fp32, windows, ref, {"tool": "dscompress", "w8a8_share": 0.0})]
    for name, (directory, report, seconds) in ours.items():
        summary = report["stages"][1]["summary"]
        extra = {"tool": "dscompress", "method": name, "w8a8_share": summary["w8a8_linear_flops_share"],
                 "stage_seconds": seconds, "torch_metrics": report["stages"][1]["metrics"]}  # fmt: skip
        rows.append(score(f"ours int8 {name} onnx-ort", directory, windows, ref, extra))
    for per_channel in (False, True):
        peer = work / f"ort-quantize-dynamic-{'pc' if per_channel else 'pt'}"
        seconds = ort_quantize_dynamic(fp32, peer, per_channel)
        label = f"onnxruntime quantize_dynamic QInt8 per_{'channel' if per_channel else 'tensor'}"
        rows.append(score(label, peer, windows, ref, {"tool": "onnxruntime", "quantize_s": seconds}))
    time_rows(rows, args.timing_rounds)
    fp32_decode = rows[0]["decode_ms_per_token"]
    for row in rows:
        row["model"], row["fp32_decode_ms_per_token"] = model, fp32_decode
        row["decode_speedup"] = fp32_decode / row["decode_ms_per_token"]
        row["prefill_speedup"] = rows[0]["prefill_s"] / row["prefill_s"]
        row["ppl_increase_pct"] = (row["perplexity"] / rows[0]["perplexity"] - 1) * 100
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.node()} {os.cpu_count()} cores (CPU), {platform.processor() or platform.machine()}",
        "command": " ".join(sys.argv),
        "eval": f"{len(windows)} held-out pydoc windows of {windows.shape[1]} tokens",
        "baseline_torch": runner_report["stages"][0]["metrics"],
        "rows": rows,
    }
    out = args.out.with_name(f"{args.out.stem}_{args.model}.json") if args.model != "smollm2" else args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
