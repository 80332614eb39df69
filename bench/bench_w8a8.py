"""Static W8A8 on a real model (SmolLM2 by default, `--model`), side by side on the same calibration and
evaluation windows:

- dscompress int8: KL with and without SmoothQuant, fallback on and off; and its calibration alone (observers,
  smoothing, threshold search), timed and memory-measured in a fresh process;
- ONNX Runtime: create_calibrator(Entropy, num_bins=2048) then QDQ W8A8 on the same model exported to ONNX
  (and MinMax for reference);
- modelopt INT8_SMOOTHQUANT_CFG, and llmcompressor SmoothQuant + W8A8 (dynamic per-token activations), each in its
  own virtual environment created under --venv-root.
Every row is scored the same way: perplexity, KL to fp32 and top-1 agreement on the held-out windows.

    .venv/bin/python bench/bench_w8a8.py                 # CPU, about 25 minutes on 2 cores
    .venv/bin/python bench/bench_w8a8.py --device cuda --only ours   # the GPU figure
    .venv/bin/python bench/bench_w8a8.py --model bundled:qwen2.5-coder-0.5b-instruct --samples 32 --only peers \
        --out bench/results/w8a8_cpu_qwen.json    # the peers on the bundled Qwen (ours: its shipped recipes)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from bench_gptq import ensure_venv, run_worker
from safetensors.torch import save_file

from dscompress.calibrate.data import Corpus
from dscompress.calibrate.metrics import BASELINE_FILE, compute_baseline
from dscompress.calibrate.spec import DataSpec, SplitSpec
from dscompress.models.load import load_model, load_tokenizer
from dscompress.models.sources import resolve

HERE = Path(__file__).resolve().parent
PEER_VENVS = {
    "modelopt": ["torch==2.13.0", "nvidia-modelopt==0.47.0", "transformers", "accelerate", "safetensors", "requests"],
    "llmcompressor": ["torch==2.13.0", "llmcompressor==0.14.0"],
}
OURS = {  # label -> Int8Config fields
    "kl+sq, fallback auto": {"calibration": "kl", "smoothquant_alpha": 0.5, "fallback": "auto"},
    "kl+sq, fallback none": {"calibration": "kl", "smoothquant_alpha": 0.5, "fallback": "none"},
    "kl, no sq, fallback none": {"calibration": "kl", "smoothquant_alpha": None, "fallback": "none"},
    "minmax+sq, fallback none": {"calibration": "minmax", "smoothquant_alpha": 0.5, "fallback": "none"},
    "minmax+sq, fallback auto": {"calibration": "minmax", "smoothquant_alpha": 0.5, "fallback": "auto"},
    "kl+sq alpha 0.8, fallback auto": {"calibration": "kl", "smoothquant_alpha": 0.8, "fallback": "auto"},
    "rotation + kl+sq, fallback auto": {
        "rotate": True,
        "calibration": "kl",
        "smoothquant_alpha": 0.5,
        "fallback": "auto",
    },
}


def export_fp32_onnx(model_dir: Path, target: Path) -> None:
    """input_ids -> logits, dynamic batch and sequence (the ORT peers' input; no KV cache needed here)."""
    if target.exists():
        return
    model = load_model(model_dir).eval()

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):
            return self.inner(input_ids=input_ids, use_cache=False).logits

    dims = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")},)
    torch.onnx.export(
        Logits(model),
        (torch.randint(0, 1000, (2, 16)),),
        str(target),
        dynamo=True,
        input_names=["input_ids"],
        output_names=["logits"],
        dynamic_shapes=dims,
        external_data=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-samples", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="bundled:smollm2-135m-instruct", help="anything `resolve` takes, e.g. a .gguf")
    ap.add_argument(
        "--only",
        choices=["all", "ours", "calibration", "calibration+ort", "peers"],
        default="all",
        help="calibration+ort: our calibration alone and ORT's entropy calibration, on this host; peers: our "
        "calibration alone and every peer (our pass rows come from the shipped recipes on the same windows)",
    )
    ap.add_argument("--peer-timeout", type=float, default=None, help="seconds before a peer's run is stopped")
    ap.add_argument("--rows", default="", help="';'-separated labels of our configurations (default: all)")
    ap.add_argument("--venv-root", type=Path, default=HERE / ".venvs")
    ap.add_argument("--work", type=Path, default=HERE / ".work" / "w8a8")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "w8a8_cpu.json")
    args = ap.parse_args()
    args.work = args.work.resolve()  # the workers run with the work folder as their cwd
    args.work.mkdir(parents=True, exist_ok=True)
    model_dir = resolve(args.model).directory
    spec = DataSpec(
        calibration=SplitSpec(samples=args.samples, seq_len=args.seq_len),
        eval=SplitSpec(samples=args.eval_samples, seq_len=args.seq_len),
    )
    corpus = Corpus(spec, load_tokenizer(model_dir))
    windows = args.work / "windows.safetensors"
    save_file({"calibration": corpus.windows("calibration"), "eval": corpus.windows("eval")}, str(windows))
    base = compute_baseline(load_model(model_dir), corpus.windows("eval"), 4, torch.device("cpu"), args.work)
    common = {
        "model": str(model_dir),
        "windows": str(windows),
        "baseline": str(args.work / BASELINE_FILE),
        "device": args.device,
    }
    rows = []

    def record(tool: str, label: str, python: Path, worker: str, **job) -> None:
        tag = f"{tool}-{label}".replace(" ", "_").replace(",", "").replace("+", "-")
        spec = {"tag": tag, "output": str(args.work / tag), **common, **job}
        result = run_worker(python, worker, spec, args.work, args.peer_timeout if tool != "dscompress" else None)
        print(tool, label, json.dumps(result), flush=True)
        rows.append({"tool": tool, "method": label, **result})
        save(args, base, rows)  # rows so far survive an interrupted run

    me = Path(sys.executable)
    record(
        "dscompress",
        "calibration only (kl+sq)",
        me,
        "ours_w8a8_worker.py",
        mode="calibrate",
        config=OURS["kl+sq, fallback auto"],
    )
    chosen = [r.strip() for r in args.rows.split(";") if r.strip()] or list(OURS)
    for label in chosen if args.only in ("all", "ours") else ():
        config = OURS[label]
        record("dscompress", label, me, "ours_w8a8_worker.py", mode="pass", config=config)
    if args.only in ("all", "peers"):
        modelopt = ensure_venv(args.venv_root, "modelopt", PEER_VENVS["modelopt"])
        record("modelopt", "INT8_SMOOTHQUANT_CFG", modelopt, "modelopt_w8a8_worker.py")
        llmc = ensure_venv(args.venv_root, "llmcompressor")
        record("llmcompressor", "SQ 0.5 + W8A8 dynamic", llmc, "llmcompressor_w8a8_worker.py")
    if args.only in ("all", "calibration+ort", "peers"):  # last: ORT's entropy calibration is the slowest row
        onnx_path = args.work / "fp32.onnx"
        export_fp32_onnx(model_dir, onnx_path)
        for method in ("minmax", "entropy") if args.only != "calibration+ort" else ("entropy",):
            record(
                "onnxruntime", f"{method} QDQ", me, "ort_w8a8_worker.py", onnx=str(onnx_path), method=method, chunk=4
            )


def save(args, base: dict, rows: list) -> None:
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "model": args.model,
        "machine": f"{platform.node()} {os.cpu_count()} cores",
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(0),
        "command": " ".join(sys.argv),
        "baseline": base,
        "rows": rows,
        "settings": {k: str(v) for k, v in vars(args).items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
