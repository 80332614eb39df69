"""ONNX on the real SmolLM2 through ONNX Runtime (CPU), in one script:

- fp32 ONNX (our export, KV cache);
- our INT8 W8A8 Q/DQ (`onnx` target, KL + SmoothQuant, fallback to the 2% gate);
- our GPTQ INT4 g64 as MatMulNBits (`onnx-ort` target);
- the peer: ONNX Runtime's own MatMulNBitsQuantizer (RTN 4-bit, block 64, symmetric) run on our fp32 ONNX.
Each is scored on the same held-out windows (perplexity, KL to fp32 torch, top-1), and timed by
`dscompress bench` (prefill, decode ms/token, peak RSS, each model in its own process).
For a tiny Qwen2, `--optimum` also compares logits and greedy tokens against optimum-onnx's export, run in its own
virtual environment (optimum-onnx pins transformers below 4.58).

    .venv/bin/python bench/bench_onnx.py            # about 20 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import onnx
import torch
from bench_gptq import ensure_venv

from dscompress.calibrate.metrics import BaselineRef, evaluate
from dscompress.export.benchmark import bench
from dscompress.export.ort_runner import OrtLM
from dscompress.export.stage_export import export_stage, parity
from dscompress.gates import OnnxParity
from dscompress.models.sources import resolve
from dscompress.recipe import load_recipe
from dscompress.runner import Runner

HERE = Path(__file__).resolve().parent
RECIPE = """
model: {path: bundled:smollm2-135m-instruct}
data: {eval: {samples: 16, seq_len: 512}, calibration: {samples: 32, seq_len: 512}}
stages:
  - STAGE
output_dir: out
"""
GPTQ = """name: w4-gptq
    gptq: {bits: 4, group_size: 64, symmetric: false, exclude: [embed_tokens]}   # lm_head too, as the ORT peer
    gate: {perplexity: {max_increase_pct: 15}}
    onnx: {targets: [onnx-ort]}"""
W8A8 = """name: w8a8
    int8: {calibration: kl, smoothquant_alpha: 0.5, fallback: auto}
    gate: {perplexity: {max_increase_pct: 2}}
    onnx: {targets: [onnx]}"""


def run_stage(work: Path, name: str, stage: str):
    """One stage from the baseline (each variant compresses the fp32 model, not the previous stage)."""
    (work / f"{name}.yaml").write_text(RECIPE.replace("STAGE", stage))
    recipe, located = load_recipe(work / f"{name}.yaml")
    runner = Runner(recipe, work / f"{name}.yaml", work / name, located=located)
    return runner, runner.run()


def ort_peer(fp32_dir: Path, target: Path, block: int) -> float:
    """ONNX Runtime's MatMulNBitsQuantizer (RTN) on our fp32 export; returns its quantization seconds."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    target.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32_dir / "model.onnx")), block_size=block, is_symmetric=True)
    quantizer.process()
    seconds = time.perf_counter() - started
    quantizer.model.save_model_to_file(str(target / "model.onnx"), use_external_data_format=False)
    for f in fp32_dir.iterdir():
        if f.is_file() and not f.name.startswith("model"):
            shutil.copy2(f, target / f.name)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=HERE / ".work" / "onnx")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "onnx_cpu.json")
    ap.add_argument("--optimum", action="store_true", help="also the tiny-Qwen2 parity check against optimum-onnx")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    runner, gptq_report = run_stage(args.work, "gptq", GPTQ)
    _, w8a8_report = run_stage(args.work, "w8a8", W8A8)
    windows = runner.corpus.windows("eval")
    ref = BaselineRef(args.work / "gptq" / "0-baseline")
    report = {"stages": gptq_report["stages"] + w8a8_report["stages"][1:]}
    fp32 = args.work / "fp32"
    source = resolve("bundled:smollm2-135m-instruct").directory
    export_stage(source, "onnx", fp32)
    tolerance = OnnxParity(greedy_prompts=4, greedy_tokens=16)
    fp32_check = parity(source, fp32, windows, ref, report["stages"][0]["metrics"], tolerance, 4)
    peer = args.work / "ort-rtn-w4b64"
    peer_seconds = ort_peer(fp32, peer, 64)
    variants = {
        "fp32 onnx": fp32,
        "ours int8 w8a8 onnx (Q/DQ)": args.work / "w8a8" / "1-w8a8" / "onnx" / "onnx",
        "ours gptq int4 g64 onnx-ort": args.work / "gptq" / "1-w4-gptq" / "onnx" / "onnx-ort",
        "ort MatMulNBitsQuantizer rtn int4 b64": peer,
    }
    rows = []
    for label, directory in variants.items():
        metrics = evaluate(OrtLM(directory), windows, ref, 4, torch.device("cpu"))
        timing = bench([directory], prompt_len=128, new_tokens=64, repeats=3)[0]
        rows.append({"variant": label, **metrics, **timing})
        print(label, json.dumps(rows[-1]), flush=True)
    torch_timing = bench([args.work / "gptq" / "0-baseline"], prompt_len=128, new_tokens=64, repeats=3)[0]
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.node()} {os.cpu_count()} cores (CPU)",
        "command": " ".join(sys.argv),
        "rows": rows,
        "fp32_parity": {"metrics": fp32_check[0], "verdicts": [v.as_dict() for v in fp32_check[1]]},
        "torch_fp32": torch_timing,
        "ort_peer_quantize_s": peer_seconds,
        "stages": [{k: s[k] for k in ("dir", "metrics", "onnx", "parity", "summary")} for s in report["stages"][1:]],
    }
    if args.optimum:
        result["optimum"] = optimum_parity(args.work)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")


def optimum_parity(work: Path) -> dict:
    """Tiny Qwen2: max |logit diff| and greedy agreement of optimum-onnx's export and ours, against torch."""
    import subprocess

    stage = resolve("tiny:qwen2").directory
    ours = work / "tiny-qwen2-ours"
    export_stage(stage, "onnx", ours)
    python = ensure_venv(HERE / ".venvs", "optimum-onnx", ["torch==2.13.0", "optimum-onnx[onnxruntime]"])
    proc = subprocess.run(
        [str(python), str(HERE / "peers" / "optimum_worker.py"), str(stage), str(work / "optimum")],
        capture_output=True,
        text=True,
        check=False,
    )
    peer = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {"error": proc.stderr[-500:]}
    from dscompress.models.load import load_model

    model, lm = load_model(stage).eval(), OrtLM(ours)
    ids = torch.tensor(peer.get("ids") or list(range(100, 132)))[None]
    with torch.no_grad():
        ours_diff = float((lm.logits(ids) - model(ids).logits).abs().max())
    return {"ours_max_logit_diff": ours_diff, "optimum": peer}


if __name__ == "__main__":
    main()
