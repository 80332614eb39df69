"""Distillation recovery of the real SmolLM2 pruned by 25% (before/after pruning, after distillation, tokens/s),
against modelopt.torch.distill at the same token budget, data, sample order, optimizer and schedule; LoRA
recovery (`distill: {lora: ...}`) at the same tokens; a GPTQ W4 student recovered with LoRA; and the same
distillation on 1 vs N GPUs (scaling and numerical equivalence).

    python bench/bench_distill.py --minutes 7                   # ours, then the modelopt peer (GPU host)
    python bench/bench_distill.py --tokens 6000000 --lora-ranks 16,64 --gptq-lora  # + LoRA rows, GPTQ + LoRA
    python bench/bench_distill.py --scaling 1,2 --tokens 8000000  # tokens/s on 1 and 2 GPUs

Rows for issue #20 (full, lora, modelopt; peak GPU memory) go to --rows (bench/results/distill_lora.json).

The prune stage solves the MLP width for 25% fewer parameters (bench_prune's best mix at 25%). Training text is
the pydoc train split plus the standard library's docstrings (`extra_train_source`); evaluation is the held-out
pydoc split, as in every other bench.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import yaml
from bench_gptq import ensure_venv, run_worker
from bench_prune import solve
from safetensors.torch import save_file

from dscompress.calibrate.data import Corpus
from dscompress.compress.distill.train import epoch_order
from dscompress.compress.prune.config import PruneConfig, Size
from dscompress.compress.prune.sizes import new_sizes
from dscompress.models.adapters import adapter_for
from dscompress.models.load import load_config, load_tokenizer
from dscompress.models.sources import resolve
from dscompress.recipe import load_recipe
from dscompress.runner import Runner

HERE = Path(__file__).resolve().parent
MODEL = "bundled:smollm2-135m-instruct"


def mlp_size(model: str, target: float) -> int:
    config = load_config(resolve(model).directory)
    from dscompress.models.info import inspect_config

    total = inspect_config(config).n_params
    cfg = solve(config, adapter_for(config), lambda x: PruneConfig(mlp=Size(ratio=x)), total, target)
    return new_sizes(config, adapter_for(config), cfg)[0]["intermediate_size"]


def recipe(args, distill: dict | None, first: dict | None = None, gate: dict | None = None) -> dict:
    first = first or {"name": "prune25", "prune": {"mlp": {"size": mlp_size(args.model, 0.25)}}}
    gate = gate or {"perplexity": {"max_increase_pct": 10}}
    return {
        "model": {"path": args.model},
        "data": {"extra_train_source": "builtin:stdlib-docstrings", "train": {"samples": "all", "seq_len": 512},
                 "calibration": {"samples": 32, "seq_len": 512}, "batch_size": 16},
        "stages": [first] + ([{"distill": distill, "gate": gate, "name": args.name}] if distill else []),
    }  # fmt: skip


def run(args, distill: dict | None, name: str, first: dict | None = None, gate: dict | None = None) -> dict:
    """One recipe through the Runner in this process; its report, wall time and peak accelerator memory."""
    args.name = name
    path = args.work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe(args, distill, first, gate), sort_keys=False))
    loaded, located = load_recipe(path)
    out = args.work / ("out" if first is None else f"out-{first['name']}")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        report = Runner(loaded, path, out, located=located).run()
    except Exception as exc:  # a failed gate still leaves the report
        print(f"{name}: {exc}", file=sys.stderr)
        report = json.loads((out / "report.json").read_text())
    report["wall_s"] = time.perf_counter() - started
    report["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return report


def row(report: dict, method: str, **extra) -> dict:
    """One distill_lora.json row from a report whose last stage distilled the one before it."""
    base, before, after = report["stages"][0], report["stages"][-2], report["stages"][-1]
    s = after["summary"]
    return {"model": report["model"], "method": method, "tokens": s["tokens"], "tokens_per_s": s["train_tokens_per_s"],
            "stage_tokens_per_s": s["tokens_per_s"], "train_seconds": s["train_seconds"],
            "eval_seconds": s["eval_seconds"], "peak_gpu_gib": report["peak_gpu_gib"],
            "ppl_before": before["metrics"]["perplexity"], "ppl_after": after["metrics"]["perplexity"],
            "baseline_ppl": base["metrics"]["perplexity"], "kl_before": before["metrics"]["kl"],
            "kl_after": after["metrics"]["kl"], "top1_after": after["metrics"]["top1"], "status": after["status"],
            "lora": s.get("lora"), **extra}  # fmt: skip


def distill_config(args, **budget) -> dict:
    return {"budget": budget, "lr": args.lr, "batch_size": args.batch_size, "warmup_steps": 20,
            "eval_every": args.eval_every, "checkpoint_every": 500,
            "stop_when_gate_met": args.stop_at_gate, "compile": args.compile}  # fmt: skip


def lora_config(args, rank: int, **budget) -> dict:
    return distill_config(args, **budget) | {"lr": args.lora_lr, "lora": {"rank": rank, "alpha": 2 * rank}}


def gptq_lora(args, rows: list) -> None:
    """GPTQ W4 g64 asymmetric, then LoRA recovery through its grid (ste) and re-quantized (requantize), each gated
    on KL below the plain GPTQ stage's."""
    gptq = {"name": "gptq", "gptq": {"bits": 4, "group_size": 64, "symmetric": False}}
    plain = run(args, None, "gptq", first=gptq)
    kl = plain["stages"][1]["metrics"]["kl"]
    for mode in ("ste", "requantize"):
        config = lora_config(args, args.gptq_rank, tokens=args.gptq_tokens) | {"quantized": mode}
        report = run(args, config, f"gptq-lora-{mode}", first=gptq, gate={"kl": {"max": kl}})
        rows.append(
            row(report, "lora", student="gptq w4 g64 asym", quantized=mode, gate_kl_max=kl, compile=args.compile)
        )
        save(args.rows, rows)


def peer(args, report: dict, config: dict) -> dict:
    """modelopt at exactly the tokens our run used, same sample order."""
    spec = report["stages"][2]["summary"]
    steps, out = spec["steps"], args.work / "out"
    loaded, _ = load_recipe(args.work / "ours.yaml")
    corpus = Corpus(loaded.data, load_tokenizer(resolve(args.model).directory))
    train, n = corpus.windows("train"), len(corpus.windows("train"))
    seed = loaded.seed + 2  # the distill stage's seed (recipe seed + stage index)
    total = steps * config["batch_size"]
    order = torch.cat([epoch_order(n, seed, e) for e in range(total // n + 1)])[:total].tolist()
    windows = args.work / "distill-windows.safetensors"
    save_file({"train": train, "eval": corpus.windows("eval")}, str(windows))
    requirements = ["torch==2.13.0", "nvidia-modelopt==0.47.0", "transformers", "requests"]
    python = Path(sys.executable) if args.peer_python else ensure_venv(HERE / ".venvs", "modelopt", requirements)
    job = {"tag": "modelopt-distill", "teacher": str(out / "0-baseline"), "student": str(out / "1-prune25"),
           "windows": str(windows), "baseline": str(out / "0-baseline" / "baseline_logprobs.safetensors"),
           "config": {**config, "temperature": 1.0, "weight_decay": 0.0, "min_lr_ratio": 0.1, "max_grad_norm": 1.0},
           "order": order, "steps": steps}  # fmt: skip
    return run_worker(python, "modelopt_distill_worker.py", job, args.work)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=MODEL, help="bundled:qwen2.5-coder-0.5b-instruct for the Qwen rows")
    ap.add_argument("--minutes", type=float, default=7.0, help="our distillation budget")
    ap.add_argument("--tokens", type=int, default=None, help="token budget instead (scaling runs use it)")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--stop-at-gate", action="store_true", help="stop once perplexity is within 10%")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--peer-python", action="store_true", help="run modelopt in this interpreter (GPU host)")
    ap.add_argument("--scaling", default=None, help="device counts, e.g. 1,2: token-budget runs on each")
    ap.add_argument("--work", type=Path, default=HERE / ".work" / "distill")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "distill_gpu.json")
    ap.add_argument("--rows", type=Path, default=HERE / "results" / "distill_lora.json")
    ap.add_argument("--lora-ranks", default="", help="LoRA ranks to run at the same tokens, e.g. 16,64")
    ap.add_argument("--lora-lr", type=float, default=1e-3)
    ap.add_argument("--gptq-lora", action="store_true", help="GPTQ W4 student recovered with LoRA")
    ap.add_argument("--gptq-rank", type=int, default=16)
    ap.add_argument("--gptq-tokens", type=int, default=2_000_000)
    ap.add_argument("--skip-full", action="store_true", help="only the LoRA / GPTQ rows")
    ap.add_argument("--compile", type=yaml.safe_load, default="auto", help="distill's compile: auto, true, false")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} {os.cpu_count()} cores",
              "gpu": gpu, "gpus": torch.cuda.device_count(), "command": " ".join(sys.argv), "runs": {}}  # fmt: skip
    if args.scaling:
        for n in [int(x) for x in args.scaling.split(",")]:
            config = distill_config(args, tokens=args.tokens) | {"devices": n}
            result["runs"][f"devices={n}"] = run(args, config, f"distill-{n}gpu")
            save(args.out, result)
        return
    budget = {"tokens": args.tokens} if args.tokens else {"minutes": args.minutes}
    config, rows = distill_config(args, **budget), []
    if not args.skip_full:
        result["runs"]["ours"] = run(args, config, "ours")
        rows.append(row(result["runs"]["ours"], "full", lr=args.lr, compile=args.compile))
        save(args.out, result)
    if not args.no_peer and not args.skip_full:
        result["runs"]["modelopt"] = peer(args, result["runs"]["ours"], config)
        rows.append(peer_row(result["runs"]["ours"], result["runs"]["modelopt"]))
        save(args.out, result)
        save(args.rows, rows)
    for rank in [int(r) for r in args.lora_ranks.split(",") if r]:
        result["runs"][f"lora{rank}"] = run(args, lora_config(args, rank, **budget), f"lora{rank}")
        rows.append(row(result["runs"][f"lora{rank}"], "lora", lr=args.lora_lr, compile=args.compile))
        save(args.out, result)
        save(args.rows, rows)
    if args.gptq_lora:
        gptq_lora(args, rows)
    save(args.rows, rows)


def peer_row(ours: dict, peer_result: dict) -> dict:
    if "error" in peer_result:
        return {"model": ours["model"], "method": "modelopt", "error": peer_result["error"]}
    base, before = ours["stages"][0]["metrics"], ours["stages"][1]["metrics"]
    return {"model": ours["model"], "method": "modelopt", "tokens": peer_result["tokens"],
            "tokens_per_s": peer_result["tokens_per_s"], "train_seconds": peer_result["seconds"],
            "peak_gpu_gib": peer_result.get("peak_gpu_gib"), "ppl_before": before["perplexity"],
            "ppl_after": peer_result["perplexity"], "baseline_ppl": base["perplexity"], "kl_before": before["kl"],
            "kl_after": peer_result["kl"], "top1_after": peer_result["top1"]}  # fmt: skip


def save(out: Path, result) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if isinstance(result, dict):
        print(json.dumps({k: v for k, v in result.items() if k != "runs"}), flush=True)


if __name__ == "__main__":
    main()
