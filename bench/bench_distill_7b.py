"""Distillation at the Qwen2.5-7B shape on one GPU: LoRA (`distill: {lora: ...}`) against full distillation, peak
accelerator memory and training tokens/s (random bf16 weights: memory and speed only, issue #20).

    python bench/bench_distill_7b.py --work /tmp/d7 --methods lora,full --steps 12

The random model (bench_gptq_gpu.random_model, vocabulary 152,064) is written once as a checkpoint with SmolLM2's
tokenizer (its 49,152 ids are valid ids of the larger vocabulary), then each method runs the same recipe through
the Runner in this process: teacher = the baseline (the same model, bf16), student = a bf16 copy, batch 8 x 512,
bf16 autocast. Full distillation keeps bf16 weights, gradients and AdamW moments (8 bytes per parameter); a run that
runs out of memory becomes an error row with the allocator's message. Rows are appended to --rows
(bench/results/distill_lora.json).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml
from bench_gptq_gpu import random_model

from dscompress.models.sources import resolve
from dscompress.recipe import load_recipe
from dscompress.runner import Runner

HERE = Path(__file__).resolve().parent
TOKENIZER_FROM = "bundled:smollm2-135m-instruct"


def write_model(directory: Path, shape: str) -> None:
    if (directory / "config.json").exists():
        return
    model = random_model(shape, torch.bfloat16, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    model.save_pretrained(directory)
    for f in resolve(TOKENIZER_FROM).directory.glob("tokenizer*"):
        shutil.copy(f, directory / f.name)
    del model
    gc.collect()


def recipe(model_dir: Path, method: str, args) -> dict:
    distill = {"budget": {"tokens": args.steps * args.batch * 512}, "batch_size": args.batch, "lr": 1e-4,
               "eval_every": 10**6, "checkpoint_every": 10**6, "stop_when_gate_met": False,
               "warmup_steps": 2}  # fmt: skip
    if method == "lora":
        distill |= {"lora": {"rank": args.rank, "alpha": 2 * args.rank}, "lr": 1e-3}
    return {
        "model": {"path": str(model_dir), "dtype": "bfloat16"},
        "data": {"train": {"samples": 64, "seq_len": 512}, "eval": {"samples": 4, "seq_len": 512},
                 "calibration": {"samples": 4, "seq_len": 512}, "batch_size": 2},
        "stages": [{"name": method, "distill": distill, "gate": {"kl": {"max": 100.0}}}],
    }  # fmt: skip


def run(model_dir: Path, method: str, args) -> dict:
    path = args.work / f"{method}.yaml"
    path.write_text(yaml.safe_dump(recipe(model_dir, method, args), sort_keys=False))
    loaded, located = load_recipe(path)
    gc.collect()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    out = args.work / f"out-{method}"
    row = {"model": f"{args.shape} shape (random bf16)", "method": method, "batch": f"{args.batch} x 512"}
    try:
        report = Runner(loaded, path, out, located=located).run()
    except Exception as exc:  # out of memory: the error row says so
        row["error"] = str(exc).splitlines()[0][:300]
        row["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        return row | {"wall_s": time.perf_counter() - started}
    stage = report["stages"][-1]
    s = stage["summary"]
    shutil.rmtree(out, ignore_errors=True)  # 15 GB per stage
    return row | {
        "tokens": s["tokens"], "tokens_per_s": s["train_tokens_per_s"], "train_seconds": s["train_seconds"],
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None, "lora": s.get("lora"),
        "ppl_before": report["stages"][0]["metrics"]["perplexity"], "ppl_after": stage["metrics"]["perplexity"],
        "baseline_ppl": report["stages"][0]["metrics"]["perplexity"], "wall_s": time.perf_counter() - started,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=HERE / ".work" / "distill7b")
    ap.add_argument("--methods", default="lora,full")
    ap.add_argument("--shape", default="qwen2.5-7b", help="a bench_gptq_gpu shape (smollm2-135m: a CPU smoke run)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rows", type=Path, default=HERE / "results" / "distill_lora.json")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model_dir = args.work / args.shape
    started = time.perf_counter()
    write_model(model_dir, args.shape)
    print(f"model written in {time.perf_counter() - started:.0f} s", flush=True)
    rows = json.loads(args.rows.read_text()) if args.rows.exists() else []
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    meta = {"date": time.strftime("%Y-%m-%d"), "gpu": gpu, "command": " ".join(sys.argv), "torch": torch.__version__}
    for method in args.methods.split(","):
        rows.append(run(model_dir, method, args) | meta)
        print(json.dumps(rows[-1]), flush=True)
        args.rows.parent.mkdir(parents=True, exist_ok=True)
        args.rows.write_text(json.dumps(rows, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
