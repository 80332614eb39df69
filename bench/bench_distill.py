"""Distillation recovery of the real SmolLM2 pruned by 25% (before/after pruning, after distillation, tokens/s),
against modelopt.torch.distill at the same token budget, data, sample order, optimizer and schedule; and the
same distillation on 1 vs N GPUs (scaling and numerical equivalence).

    python bench/bench_distill.py --minutes 7                   # ours, then the modelopt peer (GPU host)
    python bench/bench_distill.py --scaling 1,2 --tokens 8000000  # tokens/s on 1 and 2 GPUs

The prune stage solves the MLP width for 25% fewer parameters (bench_prune's best mix at 25%). Training text is
the pydoc train split plus the standard library's docstrings (`extra_train_source`); evaluation is the held-out
pydoc split, as in every other bench.
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


def mlp_size(target: float) -> int:
    config = load_config(resolve(MODEL).directory)
    from dscompress.models.info import inspect_config

    total = inspect_config(config).n_params
    cfg = solve(config, adapter_for(config), lambda x: PruneConfig(mlp=Size(ratio=x)), total, target)
    return new_sizes(config, adapter_for(config), cfg)[0]["intermediate_size"]


def recipe(args, distill: dict) -> dict:
    return {
        "model": {"path": MODEL},
        "data": {"extra_train_source": "builtin:stdlib-docstrings", "train": {"samples": "all", "seq_len": 512},
                 "calibration": {"samples": 32, "seq_len": 512}, "batch_size": 16},
        "stages": [
            {"name": "prune25", "prune": {"mlp": {"size": mlp_size(0.25)}}},
            {"distill": distill, "gate": {"perplexity": {"max_increase_pct": 10}}, **({"name": args.name})},
        ],
    }  # fmt: skip


def run(args, distill: dict, name: str) -> dict:
    args.name = name
    path = args.work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe(args, distill), sort_keys=False))
    loaded, located = load_recipe(path)
    started = time.perf_counter()
    try:
        report = Runner(loaded, path, args.work / "out", located=located).run()
    except Exception as exc:  # a failed gate still leaves the report
        print(f"{name}: {exc}", file=sys.stderr)
        report = json.loads((args.work / "out" / "report.json").read_text())
    report["wall_s"] = time.perf_counter() - started
    return report


def distill_config(args, **budget) -> dict:
    return {"budget": budget, "lr": args.lr, "batch_size": args.batch_size, "warmup_steps": 20,
            "eval_every": args.eval_every, "checkpoint_every": 500,
            "stop_when_gate_met": args.stop_at_gate}  # fmt: skip


def peer(args, report: dict, config: dict) -> dict:
    """modelopt at exactly the tokens our run used, same sample order."""
    spec = report["stages"][2]["summary"]
    steps, out = spec["steps"], args.work / "out"
    loaded, _ = load_recipe(args.work / "ours.yaml")
    corpus = Corpus(loaded.data, load_tokenizer(resolve(MODEL).directory))
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
    config = distill_config(args, **budget)
    result["runs"]["ours"] = run(args, config, "ours")
    save(args.out, result)
    if not args.no_peer:
        result["runs"]["modelopt"] = peer(args, result["runs"]["ours"], config)
        save(args.out, result)


def save(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}), flush=True)


if __name__ == "__main__":
    main()
