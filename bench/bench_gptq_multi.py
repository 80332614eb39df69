"""GPTQ on 1 vs N GPUs of one host: wall time, and whether N GPUs give the same model (issue #9).

Each run quantizes the same checkpoint, read fresh from disk, with `gptq: {devices: N}` through the pass's own
entry point (N > 1: one worker process per GPU, NCCL). Timed: the pass call, which for N > 1 includes starting
the workers and each worker loading the checkpoint. Compared: every quantized weight against the 1-GPU result
(share of identical values), and the quantized models' outputs on held-out windows (KL and top-1 agreement of
N GPUs against 1 GPU; for a real model also perplexity, KL and top-1 against the unquantized model).

    python bench/bench_gptq_multi.py --model qwen2.5-7b --devices 1,2 --samples 64 --group-size 128
    python bench/bench_gptq_multi.py --model bundled:smollm2-135m-instruct --devices 1,2 --group-size 64
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from bench_gptq_gpu import SHAPES, random_model

from dscompress.calibrate.data import Corpus
from dscompress.calibrate.metrics import BaselineRef, compute_baseline, evaluate
from dscompress.calibrate.spec import DataSpec, SplitSpec
from dscompress.compress.gptq.apply import apply
from dscompress.compress.gptq.config import GPTQConfig
from dscompress.compress.gptq.dist import target_param
from dscompress.context import StageContext
from dscompress.models.load import load_model, load_tokenizer
from dscompress.models.sources import resolve


def prepare(args) -> tuple[Path, torch.Tensor, torch.Tensor, str]:
    """(checkpoint dir, calibration windows, eval windows, dtype)."""
    if args.model in SHAPES:  # random weights of a real shape, written once as a checkpoint
        directory = args.work / args.model
        if not (directory / "config.json").exists():
            random_model(args.model, torch.bfloat16, torch.device("cuda")).save_pretrained(directory)
        vocab = SHAPES[args.model]().vocab_size
        g = torch.Generator().manual_seed(0)
        cal = torch.randint(0, vocab, (args.samples, args.seq_len), generator=g)
        return directory, cal, torch.randint(0, vocab, (args.eval_samples, args.seq_len), generator=g), "bfloat16"
    directory = resolve(args.model).directory
    spec = DataSpec(calibration=SplitSpec(samples=args.samples, seq_len=args.seq_len),
                    eval=SplitSpec(samples=args.eval_samples, seq_len=args.seq_len))  # fmt: skip
    corpus = Corpus(spec, load_tokenizer(directory))
    return directory, corpus.windows("calibration"), corpus.windows("eval"), args.dtype


def quantize(directory: Path, dtype: str, cal: torch.Tensor, devices: int, group_size: int, batch_size: int = 8,
             kernel: str = "auto"):  # fmt: skip
    model = load_model(directory, dtype)
    config = GPTQConfig(bits=4, group_size=group_size, symmetric=True, devices=devices, batch_size=batch_size,
                        kernel=kernel)  # fmt: skip
    with StageContext.standalone(model, cal, "cuda:0", input_dir=directory, dtype=dtype) as ctx:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = apply(model, config, ctx)
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def identical_share(a, b) -> dict:
    shares = {}
    for name, meta in a.quant.targets.items():
        wa, wb = target_param(a.model, name, meta["kind"]), target_param(b.model, name, meta["kind"])
        shares[name] = float((wa == wb).float().mean())
    return {"min": min(shares.values()), "mean": sum(shares.values()) / len(shares), "targets": len(shares)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-7b", help=f"{', '.join(SHAPES)} (random weights) or a model path")
    ap.add_argument("--devices", default="1,2")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-samples", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--noise-floor", action="store_true", help="also 1 device with batch_size 4, against 1 device")
    ap.add_argument(
        "--compare-kernel",
        action="store_true",
        help="also 1 device with the eager loop (kernel: torch), against 1 device with the fused kernel",
    )
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-gptq-multi"))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    for sub in ("fp", "one"):
        (args.work / sub).mkdir(parents=True, exist_ok=True)
    directory, cal, ev, dtype = prepare(args)
    device = torch.device("cuda:0")
    real = args.model not in SHAPES
    if real:
        compute_baseline(load_model(directory, dtype).to(device), ev, 4, device, args.work / "fp")
    runs, first = [], None
    plan = [(int(d), 8, "auto") for d in args.devices.split(",")]
    if args.noise_floor:  # one device again, batch_size 4: how far float summation order alone moves the result
        plan.append((1, 4, "auto"))
    if args.compare_kernel:  # one device again, the eager column loop instead of the fused block kernel
        plan.append((1, 8, "torch"))
    for n, batch_size, kernel in plan:
        out, seconds = quantize(directory, dtype, cal, n, args.group_size, batch_size, kernel)
        peak = round(out.summary["peak_accelerator_bytes"] / 2**30, 3)
        row = {"devices": out.summary["devices"], "batch_size": batch_size, "kernel": kernel,
               "gptq_seconds": round(seconds, 2),
               "pass_seconds_in_worker": out.summary["pass_seconds"], "peak_gib_per_gpu": peak,
               "experts_rtn_fallback": out.summary["experts_rtn_fallback"],
               # where the time goes: reading / storing blocks, the launcher's and rank 0's own phases
               **{k: out.summary[k] for k in ("io_seconds", "launcher_seconds", "worker_seconds", "layer_seconds")
                  if k in out.summary}}  # fmt: skip
        out.model.to(device)
        if real:
            row["vs_unquantized"] = evaluate(out.model, ev, BaselineRef(args.work / "fp"), 4, device)
        if first is None:
            first = out
            compute_baseline(out.model, ev, 2, device, args.work / "one")
        else:
            row["vs_1_gpu"] = evaluate(out.model, ev, BaselineRef(args.work / "one"), 2, device)
        out.model.to("cpu")
        torch.cuda.empty_cache()
        if first is not out:
            row["identical_weights_vs_1_gpu"] = identical_share(first, out)
            row["speedup_vs_1_gpu"] = round(runs[0]["gptq_seconds"] / seconds, 3)
        runs.append(row)
        print(json.dumps(row), flush=True)
        report = {
            "date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
            "command": "python " + " ".join(sys.argv), "model": args.model, "random_weights": not real,
            "samples": args.samples, "seq_len": args.seq_len, "group_size": args.group_size, "dtype": dtype,
            "params": sum(p.numel() for p in out.model.parameters()), "torch": torch.__version__, "runs": runs,
        }  # fmt: skip
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
