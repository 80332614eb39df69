"""Structured pruning of a real model (SmolLM2 by default, `--model bundled:qwen2.5-coder-0.5b-instruct`) at
matched parameter counts (10%, 25%, 40% fewer), before any retraining:
each of our importance modes and dimensions, against torch-pruning 1.6 (its LLM pruning, in its own venv).

For each target, our sizes are solved so the pruned model has the target parameter count (parameter counts come
from the pruned config on the meta device, the same code `plan` uses); torch-pruning's ratio is searched the same
way inside its worker. Every row is scored on the same held-out windows: perplexity, KL to fp32, top-1.

    .venv/bin/python bench/bench_prune.py     # about 15 minutes on 2 cores
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
from rich.console import Console
from safetensors.torch import save_file

from dscompress.calibrate.data import Corpus
from dscompress.calibrate.metrics import BASELINE_FILE, BaselineRef, compute_baseline, evaluate
from dscompress.calibrate.spec import DataSpec, SplitSpec
from dscompress.compress.prune.apply import apply as prune_apply
from dscompress.compress.prune.config import DepthSize, HeadSize, PruneConfig, Size
from dscompress.compress.prune.sizes import pruned_config
from dscompress.context import StageContext, make_progress
from dscompress.models.adapters import adapter_for
from dscompress.models.info import inspect_config
from dscompress.models.load import load_model, load_tokenizer
from dscompress.models.sources import resolve

HERE = Path(__file__).resolve().parent


def params_after(config, adapter, cfg: PruneConfig) -> int:
    layers = config.num_hidden_layers
    keep = cfg.depth.keep(layers) if cfg.depth else layers
    return inspect_config(pruned_config(config, adapter, cfg, list(range(keep)))).n_params


def solve(config, adapter, make, total: int, target: float) -> PruneConfig | None:
    """The config from `make(x)` (x in [0, 1)) whose parameter count is closest to total * (1 - target)."""
    goal, best = total * (1 - target), None
    lo, hi = 0.0, 0.99
    for _ in range(18):
        mid = (lo + hi) / 2
        try:
            cfg = make(mid)
            n = params_after(config, adapter, cfg)
        except ValueError:
            hi = mid
            continue
        if best is None or abs(n - goal) < abs(best[1] - goal):
            best = (cfg, n)
        lo, hi = (mid, hi) if n > goal else (lo, mid)
    return best[0] if best and abs(best[1] - goal) / total < 0.01 else None


def variants(importance: str, once: bool):
    """Mixes of dimensions, each a function of one knob x in [0, 1) that `solve` tunes to the target size."""
    P, S = PruneConfig, Size
    mixes = {
        f"mlp ({importance})": lambda x: P(importance=importance, mlp=S(ratio=x)),
        f"heads 1/3 + mlp ({importance})": lambda x: P(importance=importance, heads=HeadSize(ratio=0.34),
                                                       mlp=S(ratio=x)),
        f"hidden ({importance})": lambda x: P(importance=importance, hidden=S(ratio=x)),
        f"hidden + mlp ({importance})": lambda x: P(importance=importance, hidden=S(ratio=x / 2), mlp=S(ratio=x)),
    }  # fmt: skip
    if once:  # depth ranks layers the same way whatever the channel importance
        mixes |= {
            "depth (block importance)": lambda x: P(depth=DepthSize(ratio=x)),
            "depth (perplexity impact)": lambda x: P(depth=DepthSize(ratio=x, metric="perplexity")),
            "depth 1/3 + mlp (activation)": lambda x: P(depth=DepthSize(ratio=x / 3), mlp=S(ratio=x)),
        }  # fmt: skip
    return mixes


def peer_rows(args, source: Path, windows: Path, targets: list[float], rows: list) -> None:
    python = Path(sys.executable) if args.peer_python else ensure_venv(
        HERE / ".venvs", "torch-pruning", ["torch==2.13.0", "torch-pruning==1.6.0", "transformers"])  # fmt: skip
    labels = {"mlp": "torch-pruning 1.6 (LLM example settings, attention ignored)",
              "all": "torch-pruning 1.6 (LLM example settings, attention and MLP)"}  # fmt: skip
    for scope in args.tp_scopes.split(","):
        failed = None
        for target in targets:
            job = {"tag": f"tp-{scope}-{target}", "model": str(source), "windows": str(windows), "target": target,
                   "scope": scope, "baseline": str(args.work / BASELINE_FILE)}  # fmt: skip
            result = failed or run_worker(python, "torch_pruning_worker.py", job, args.work, args.peer_timeout)
            failed = result if "error" in result else None  # a grouping that never closes does not at any ratio
            rows.append({"target": target, "variant": labels[scope], **result})
            print(json.dumps(rows[-1]), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calibration-samples", type=int, default=32)
    ap.add_argument("--targets", default="0.10,0.25,0.40", help="parameter shares removed, comma-separated")
    ap.add_argument("--importance", default="activation,l1")
    ap.add_argument("--no-peer", action="store_true", help="skip torch-pruning")
    ap.add_argument("--peer-python", action="store_true", help="run torch-pruning in this interpreter (GPU host)")
    ap.add_argument("--tp-scopes", default="mlp,all", help="torch-pruning runs: mlp (attention ignored), all")
    ap.add_argument("--peer-timeout", type=float, default=1800, help="seconds before a peer run is stopped")
    ap.add_argument("--variants", default="", help="only these of our variants (labels, comma-separated)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="bundled:smollm2-135m-instruct", help="anything `resolve` takes")
    ap.add_argument("--work", type=Path, default=HERE / ".work" / "prune")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "prune_cpu.json")
    args = ap.parse_args()
    args.work = args.work.resolve()  # the peer worker runs with the work folder as its cwd
    args.work.mkdir(parents=True, exist_ok=True)
    source = resolve(args.model).directory
    spec = DataSpec(calibration=SplitSpec(samples=args.calibration_samples, seq_len=512))
    corpus = Corpus(spec, load_tokenizer(source))
    cpu, console = torch.device(args.device), Console(stderr=True)
    base = compute_baseline(load_model(source).to(cpu), corpus.windows("eval"), 4, cpu, args.work)
    ref = BaselineRef(args.work)
    model = load_model(source)
    adapter, total = adapter_for(model.config), sum(p.numel() for p in model.parameters())
    rows = []
    targets = [float(t) for t in args.targets.split(",")]
    for target in targets:
        for n, importance in enumerate(args.importance.split(",")):
            for label, make in variants(importance, once=n == 0).items():
                if args.variants and label not in args.variants.split(","):
                    continue
                cfg = solve(model.config, adapter, make, total, target)
                if cfg is None:
                    rows.append({"target": target, "variant": label, "error": "cannot reach this size"})
                    continue
                started = time.perf_counter()
                try:
                    with make_progress(console) as progress:
                        ctx = StageContext(adapter, cpu, 0, console, progress, lambda: corpus.windows("calibration"))
                        result = prune_apply(load_model(source), cfg, ctx)
                except ValueError as exc:  # a mix this architecture refuses (the message says why)
                    rows.append({"target": target, "variant": label, "error": str(exc)})
                    continue
                seconds = time.perf_counter() - started
                metrics = evaluate(result.model.to(cpu), corpus.windows("eval"), ref, 4, cpu)
                rows.append({"target": target, "variant": label, "params": result.summary["params_after"],
                             "seconds": seconds, "config": cfg.model_dump(exclude_none=True), **metrics})  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
                save(args, base, total, rows)  # partial results survive an interrupted run
    windows = args.work / "windows.safetensors"
    save_file({"calibration": corpus.windows("calibration"), "eval": corpus.windows("eval")}, str(windows))
    if not args.no_peer:
        peer_rows(args, source, windows, targets, rows)
    save(args, base, total, rows)


def save(args, base: dict, total: int, rows: list) -> None:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    report = {"date": time.strftime("%Y-%m-%d"), "model": args.model,
              "machine": f"{platform.node()} {os.cpu_count()} cores ({gpu})",
              "command": " ".join(sys.argv), "baseline": base, "params": total, "rows": rows}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
