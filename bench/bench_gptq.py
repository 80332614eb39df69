"""GPTQ W4 on the real SmolLM2, side by side: dscompress vs gptqmodel 7.6 vs llmcompressor 0.14 (CPU).

Every tool quantizes the same checkpoint (our safetensors conversion of the bundled GGUF) on the same calibration
windows, with the same bits and group size; each peer runs in its own virtual environment, which this script
creates under --venv-root. Every result is then read back through dscompress' importer (GPTQ or
compressed-tensors) and scored with the pipeline's metrics on the same held-out windows: perplexity, KL to
fp32 and top-1 agreement. Finally our GPTQ checkpoint is loaded by gptqmodel, which measures perplexity itself.

    .venv/bin/python bench/bench_gptq.py --samples 16 --seq-len 512 --group-size 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from dscompress.calibrate.data import Corpus
from dscompress.calibrate.metrics import BaselineRef, compute_baseline, evaluate
from dscompress.calibrate.spec import DataSpec, SplitSpec
from dscompress.models.load import load_model, load_tokenizer
from dscompress.models.sources import resolve

HERE = Path(__file__).resolve().parent
PEERS = {  # venv name -> (pip requirements, worker, output format read back by dscompress)
    "gptqmodel": (["torch==2.13.0", "gptqmodel==7.6.0"], "gptqmodel_worker.py"),
    "llmcompressor": (["torch==2.13.0", "llmcompressor==0.14.0"], "llmcompressor_worker.py"),
}


def ensure_venv(root: Path, name: str, requirements: list[str] | None = None) -> Path:
    python = root / name / "bin" / "python"
    if not python.exists():
        print(f"creating {root / name} (one time)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(root / name)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *(requirements or PEERS[name][0])], check=True)
    return python


def peer_versions(python: Path) -> dict:
    """The versions a venv actually resolved (the pins leave transformers and the rest free)."""
    code = "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))"
    found = {}
    for name in ("torch", "transformers", "accelerate", "gptqmodel", "llmcompressor", "compressed-tensors"):
        proc = subprocess.run([str(python), "-c", code, name], capture_output=True, text=True)
        if proc.returncode == 0:
            found[name] = proc.stdout.strip()
    return found


def run_worker(python: Path, worker: str, spec: dict, work: Path, timeout: float | None = None) -> dict:
    """Run a peer's worker in its own interpreter; a crash or a run past `timeout` seconds becomes an error row."""
    job = work / f"{spec['tag']}.job.json"
    spec = {**spec, "result": str(work / f"{spec['tag']}.result.json")}
    job.write_text(json.dumps(spec))
    path = ":".join(p for p in (str(HERE / "peers"), str(HERE.parent), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    command = [str(python), str(HERE / "peers" / worker), str(job)]
    try:  # cwd: llmcompressor writes logs/ where it runs
        proc = subprocess.run(command, env=env, capture_output=True, text=True, cwd=work, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"stopped after {timeout:.0f} s without a result", "wall_s": time.perf_counter() - started}
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1], "wall_s": time.perf_counter() - started}
    return json.loads(Path(spec["result"]).read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-samples", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--venv-root", type=Path, default=HERE / ".venvs")
    ap.add_argument("--work", type=Path, default=HERE / ".work")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "gptq_cpu.json")
    ap.add_argument("--model", default="bundled:smollm2-135m-instruct")
    ap.add_argument(
        "--tools", default=",".join(("dscompress", *PEERS)), help="comma-separated, of dscompress and peers"
    )
    ap.add_argument("--grids", default="sym,asym", help="sym, asym or both")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    tools, grids = args.tools.split(","), args.grids.split(",")
    model_dir = resolve(args.model).directory
    spec = DataSpec(calibration=SplitSpec(samples=args.samples, seq_len=args.seq_len),
                    eval=SplitSpec(samples=args.eval_samples, seq_len=args.seq_len))  # fmt: skip
    corpus = Corpus(spec, load_tokenizer(model_dir))
    windows = args.work / "windows.safetensors"
    save_file({"calibration": corpus.windows("calibration"), "eval": corpus.windows("eval")}, str(windows))
    cpu = torch.device("cpu")
    base = compute_baseline(load_model(model_dir), corpus.windows("eval"), 4, cpu, args.work)
    ref = BaselineRef(args.work)
    rows = []
    for sym in (g == "sym" for g in grids):
        for tool in tools:
            tag = f"{tool}-{'sym' if sym else 'asym'}"
            job = {"tag": tag, "model": str(model_dir), "windows": str(windows), "bits": 4, "sym": sym,
                   "group_size": args.group_size, "output": str(args.work / tag), "mode": "quantize"}  # fmt: skip
            if tool == "dscompress":
                result = run_worker(Path(sys.executable), "ours_worker.py", job, args.work)
                quantized = args.work / tag / "stage"
            else:
                result = run_worker(ensure_venv(args.venv_root, tool), PEERS[tool][1], job, args.work)
                quantized = args.work / tag
            if "error" not in result:
                model = load_model(resolve(str(quantized)).directory)
                result |= evaluate(model, corpus.windows("eval"), ref, 4, cpu)
            print(tag, json.dumps(result), flush=True)
            rows.append({"tool": tool, "sym": sym, **result})
    loaded = None
    if "gptqmodel" in tools and "asym" in grids:
        loaded = gptqmodel_loads_ours(args, model_dir, windows)
    report = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} {os.cpu_count()} cores (CPU)",
        "command": " ".join(sys.argv), "model": args.model, "baseline": base, "rows": rows,
        "gptqmodel_loads_ours": loaded,
        "versions": {tool: peer_versions(ensure_venv(args.venv_root, tool)) for tool in tools if tool in PEERS}
        | {"dscompress": peer_versions(Path(sys.executable))},
        "settings": vars(args) | {"venv_root": str(args.venv_root), "work": str(args.work), "out": str(args.out)},
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")


def gptqmodel_loads_ours(args, model_dir: Path, windows: Path) -> dict:
    """gptqmodel loads our asymmetric GPTQ v2 checkpoint and measures perplexity itself."""
    check = {"tag": "gptqmodel-loads-ours", "model": str(model_dir), "windows": str(windows), "bits": 4,
             "group_size": args.group_size, "sym": False, "mode": "evaluate",
             "output": str(args.work / "dscompress-asym" / "gptq")}  # fmt: skip
    loaded = run_worker(ensure_venv(args.venv_root, "gptqmodel"), "gptqmodel_worker.py", check, args.work)
    print("gptqmodel loads ours:", json.dumps(loaded), flush=True)
    return loaded


if __name__ == "__main__":
    main()
