"""GPTQ on one GPU: dscompress and llm-compressor 0.14 side by side, in one script, on the same checkpoint (#17).

For each shape the random-init model of `bench_gptq_gpu.random_model` is written once to disk (bf16, or in
DeepSeek-V3's FP8 layout: float8_e4m3fn weights with 128 x 128 `weight_scale_inv` block scales), the same
random-token windows are saved, and each tool quantizes that checkpoint in a fresh process of its own:

- dscompress: `bench_gptq_gpu.py --load-from` (load_model, then the gptq pass), or `--stream-from` (model.stream:
  one decoder layer read from the shards at a time, FP8 dequantized as read, each finished layer written to the
  stage's shard; the writing is inside the timed pass);
- llm-compressor 0.14.0.1: `peers/llmcompressor_gpu_worker.py` (from_pretrained on the CPU, then
  oneshot(GPTQModifier)), in a venv this script makes from a folder of wheels (`--wheels`, no index needed) on
  top of the machine's own CUDA torch and transformers (bench/overlay_venv.py).

Both: W4 symmetric, group 128, static act-order, lm_head and MoE routers in float. `seconds` is load plus
quantization for both (neither saves a packed checkpoint). Peak GPU memory is torch's allocator peak, peak CPU
RSS is sampled from /proc in each tool's own process. A tool that fails (out of memory, say) is a row with
`error`. Rows are appended to --out as each finishes.

    python bench/gptq_gpu_side_by_side.py --wheels .whl-llmc --work /tmp/sbs --out sbs.json \\
        qwen2.5-7b qwen3-moe-30b-a3b-8l deepseek-v3-1d2m-fp8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_gptq_gpu import SHAPES as BENCH_SHAPES
from overlay_venv import overlay_venv
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
# name -> (bench_gptq_gpu shape, calibration windows of 512 tokens, FP8 source, dscompress streams)
SHAPES = {
    "qwen2.5-7b": ("qwen2.5-7b", 128, False, False),
    "qwen3-moe-30b-a3b-8l": ("qwen3-moe-30b-a3b-8l", 64, False, False),
    "deepseek-v3-1d2m-fp8": ("deepseek-v3-1d2m", 32, True, True),
    "deepseek-v3-1d1m-fp8": ("deepseek-v3-1d1m", 32, True, True),
    "smollm2-135m": ("smollm2-135m", 8, False, False),  # a smoke test of this script
}


def versions(python: str, names: tuple[str, ...], env: dict) -> dict:
    code = "import importlib.metadata as m, sys\nfor n in sys.argv[1:]:\n    print(n, m.version(n))"
    proc = subprocess.run([python, "-c", code, *names], capture_output=True, text=True, env=env)
    return dict(line.split() for line in proc.stdout.splitlines())


def run(cmd: list[str], env: dict, log: Path, timeout: float) -> tuple[int, str]:
    """Run `cmd`, its output to `log` (and a heartbeat line per minute here); (exit code, last line)."""
    started, killed = time.perf_counter(), False
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:
            time.sleep(1)
            elapsed = time.perf_counter() - started
            if elapsed > timeout and not killed:
                proc.kill()
                killed = True
            if int(elapsed) % 60 == 0:
                print(f"  ... {log.stem}: {elapsed:.0f} s", flush=True)
    if killed:
        return proc.returncode, f"stopped after {timeout:.0f} s (--timeout)"
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    return proc.returncode, (lines or ["(no output)"])[-1]


def ours(args, name: str, ckpt: Path, windows: Path, work: Path, env: dict) -> dict:
    shape, _, _, stream = SHAPES[name]
    result = work / f"{name}.dscompress.json"
    cmd = [sys.executable, str(HERE / "bench_gptq_gpu.py"), "--shape", shape, "--windows", str(windows),
           "--group-size", str(args.group_size), "--device", args.device, "--out", str(result)]  # fmt: skip
    if stream:
        out_dir = args.stream_out / name
        shutil.rmtree(out_dir, ignore_errors=True)
        cmd += ["--stream-from", str(ckpt), "--stream-dir", str(out_dir)]
    else:
        cmd += ["--load-from", str(ckpt)]
    code, last = run(cmd, env, work / f"{name}.dscompress.log", args.timeout)
    if stream:
        shutil.rmtree(args.stream_out / name, ignore_errors=True)
    if code != 0:
        return {"error": last[-300:]}
    r = json.loads(result.read_text())
    return {"seconds": round(r["load_s"] + r["gptq_seconds"], 2), "load_seconds": r["load_s"],
            "quantize_seconds": r["gptq_seconds"], "peak_gpu_gib": r["peak_accelerator_gib"],
            "predicted_peak_gpu_gib": r["predicted_peak_accelerator_gib"], "peak_cpu_rss_gib": r["peak_cpu_rss_gib"],
            "largest_layer_gib": r["largest_layer_gib"], "layer_seconds": r["layer_seconds"], "stream": stream,
            "layer_peak_gpu_gib": [max(p.values()) for p in r["layer_peak_accelerator_gib"] if p]}  # fmt: skip


def llmc(args, name: str, ckpt: Path, windows: Path, work: Path, python: Path) -> dict:
    job = work / f"{name}.llmcompressor.job.json"
    result = work / f"{name}.llmcompressor.json"
    copy = work / f"{name}-bf16-copy"  # FP8: the dequantized copy llm-compressor needs, on disk
    spec = {"model": str(ckpt), "windows": str(windows), "fp8": SHAPES[name][2], "group_size": args.group_size,
            "result": str(result), "bf16_copy": str(copy)}  # fmt: skip
    job.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # its own packages, not ours
    cmd = [str(python), str(HERE / "peers" / "llmcompressor_gpu_worker.py"), str(job)]
    code, last = run(cmd, env | {"HF_HUB_OFFLINE": "1"}, work / f"{name}.llmcompressor.log", args.timeout)
    shutil.rmtree(copy, ignore_errors=True)
    return json.loads(result.read_text()) if code == 0 else {"error": last[-300:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shapes", nargs="+", choices=sorted(SHAPES))
    ap.add_argument("--tools", default="dscompress,llmcompressor")
    ap.add_argument("--wheels", type=Path, help="llm-compressor's wheels (and what the machine lacks for it)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/gptq-side-by-side"))
    ap.add_argument("--stream-out", type=Path, default=None, help="where streamed stages are written (default: work)")
    ap.add_argument("--checkpoints", type=Path, default=None, help="where the checkpoints are written (default: work)")
    ap.add_argument("--out", type=Path, required=True, help="JSON list of rows, appended to")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--device", default="cuda", help="dscompress' device (cpu: a smoke test of the script)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per tool and shape")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.stream_out = args.stream_out or args.work
    args.checkpoints = args.checkpoints or args.work
    tools = args.tools.split(",")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), str(HERE), env.get("PYTHONPATH")]))
    python = overlay_venv(args.work / "llmcompressor-gpu", wheels=args.wheels) if "llmcompressor" in tools else None
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    found = {"dscompress": versions(sys.executable, ("torch", "transformers", "triton"), env)}
    if python:
        found["llmcompressor"] = versions(str(python), ("torch", "transformers", "llmcompressor",
                                                        "compressed-tensors"), env)  # fmt: skip
    for name in args.shapes:
        shape, samples, fp8, _ = SHAPES[name]
        ckpt, windows = args.checkpoints / f"{name}-checkpoint", args.work / f"{name}-windows.safetensors"
        vocab = BENCH_SHAPES[shape]().vocab_size
        rows = torch.randint(0, vocab, (samples, args.seq_len), generator=torch.Generator().manual_seed(0))
        save_file({"windows": rows}, str(windows))
        shutil.rmtree(ckpt, ignore_errors=True)
        write = [sys.executable, str(HERE / "bench_gptq_gpu.py"), "--shape", shape, "--write", str(ckpt),
                 "--device", args.device]  # fmt: skip
        code, last = run(write + (["--write-fp8"] if fp8 else []), env, args.work / f"{name}.write.log", args.timeout)
        if code != 0:
            raise SystemExit(f"{name}: writing the checkpoint failed: {last}")
        written = json.loads(last)
        for tool in tools:
            print(f"{name}: {tool}", flush=True)
            row = (ours(args, name, ckpt, windows, args.work, env) if tool == "dscompress"
                   else llmc(args, name, ckpt, windows, args.work, python))  # fmt: skip
            row = {"shape": name, "tool": tool, "windows": f"{samples} x {args.seq_len}", "gpus": 1, "card": card,
                   "versions": found[tool], "date": time.strftime("%Y-%m-%d"), "script": "gptq_gpu_side_by_side.py",
                   "checkpoint_bytes": written["checkpoint_bytes"], "fp8_source": fp8, **row}  # fmt: skip
            print(json.dumps({k: v for k, v in row.items() if not k.startswith("layer_")}), flush=True)
            existing = json.loads(args.out.read_text()) if args.out.exists() else []
            tmp = args.out.with_name(f".tmp-{args.out.name}")
            tmp.write_text(json.dumps(existing + [row], indent=2) + "\n")
            tmp.replace(args.out)
        shutil.rmtree(ckpt, ignore_errors=True)


if __name__ == "__main__":
    main()
