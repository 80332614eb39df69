"""4-bit on text it was not calibrated on (issue #19), CPU: dscompress' RTN, GPTQ and GPTQ with `clip_search` (each
also after the offline rotation: `-rot`) against NNCF's INT4 (AWQ + scale estimation) and llm-compressor's GPTQ, all
on the same pydoc calibration windows, each scored on two held-out splits: pydoc's evaluation split, and the
standard library's docstrings (`builtin:stdlib-docstrings`, a second source no calibration touches). Perplexity, KL
to the fp32 model and top-1 agreement per split.

Each peer runs in its own venv (bench/overlay_venv.py: the peer from PyPI over this interpreter's torch, and over
its transformers unless the peer pins another). Rows go to --out as a JSON list (model, tool, method,
group_size, split, ppl, baseline_ppl, kl, top1, seconds).

    python bench/bench_int4.py --model bundled:smollm2-135m-instruct --group-sizes 64 \
        --out bench/results/int4_accuracy.json
    python bench/bench_int4.py --model bundled:qwen2.5-coder-0.5b-instruct --group-sizes 128 --samples 48 \
        --out bench/results/int4_accuracy.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch
from bench_gptq import run_worker
from overlay_venv import overlay_venv
from safetensors.torch import save_file

from dscompress.calibrate.data import Corpus
from dscompress.calibrate.metrics import BaselineRef, compute_baseline, evaluate
from dscompress.calibrate.spec import DataSpec, SplitSpec
from dscompress.compress.gptq.apply import apply as gptq_apply
from dscompress.compress.gptq.config import GPTQConfig
from dscompress.compress.rtn.apply import apply as rtn_apply
from dscompress.compress.rtn.config import RTNConfig
from dscompress.context import StageContext
from dscompress.models.load import load_model, load_tokenizer
from dscompress.models.sources import resolve
from dscompress.quant.actquant import attach
from dscompress.quant.qstate import deployed_bytes

HERE = Path(__file__).resolve().parent
SPLITS = {"pydoc": "builtin:pydoc", "stdlib-docstrings": "builtin:stdlib-docstrings"}
NNCF = ["nncf==3.4.0"]
METHOD = "awq+scale_estimation"  # NNCF's
LLMC = ["llmcompressor==0.14.0.1", "transformers==5.17.0"]  # its pin: transformers <= 5.17


METHODS = re.compile(r"^(rtn|gptq|gptq-clip)(-rot)?(-head)?(?:-b([0-9.]+))?(?:-aq([0-9.]+))?(-awq)?(-a8)?$")


def ours(method: str, model_dir: Path, calibration: torch.Tensor, gs: int, sym: bool):
    """`method`: rtn, gptq or gptq-clip, then in this order: `-rot` for the offline rotation first (rotate: true),
    `-head` for lm_head quantized too (only the embedding excluded), `-b<bits>` for gptq's bits_budget, `-aq<a>`
    for gptq's GPTAQ at strength a, `-awq` for gptq's AWQ scaling first, `-a8` for `activations: int8` (scored with
    MatMulNBits' int8 block quantizer on the Linears' inputs, as the stage computes it); e.g.
    gptq-clip-rot-head-aq0.5-a8. Returns (model, seconds, deployed bytes)."""
    found = METHODS.match(method)
    if found is None:
        raise SystemExit(f"unknown method {method!r}; allowed: {METHODS.pattern}")
    base, rotate, head, budget, gptaq, awq, a8 = found.groups()
    rotate, head = bool(rotate), bool(head)
    model = load_model(model_dir)
    common = dict(bits=4, group_size=gs, symmetric=sym, rotate=rotate, activations="int8" if a8 else "float")
    if head:
        common["exclude"] = ["embed_tokens"]
    with StageContext.standalone(model, calibration, quiet=True) as ctx:
        started = time.perf_counter()
        if base == "rtn":
            out = rtn_apply(model, RTNConfig(**common), ctx)
        else:
            extra = {"bits_budget": float(budget)} if budget else {}
            extra |= {"gptaq": float(gptaq)} if gptaq else {}
            extra |= {"awq": True} if awq else {}
            out = gptq_apply(model, GPTQConfig(**common, clip_search=base == "gptq-clip", **extra), ctx)
    seconds = time.perf_counter() - started
    attach(out.model, out.quant)  # `activations: int8`: the block quantizer hooks (none otherwise)
    return out.model, seconds, deployed_bytes(out.model, out.quant)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bundled:smollm2-135m-instruct")
    ap.add_argument("--group-sizes", default="64,128")
    ap.add_argument("--symmetric", action="store_true", help="symmetric grids (default: asymmetric)")
    ap.add_argument("--samples", type=int, default=64, help="calibration windows")
    ap.add_argument("--eval-samples", type=int, default=16, help="evaluation windows per split")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--methods", default="rtn,gptq,gptq-clip", help="see ours(): e.g. gptq-clip-rot-head-b5.2")
    ap.add_argument("--tools", default="dscompress,nncf,llmcompressor")
    ap.add_argument("--venv-root", type=Path, default=Path.home() / ".cache" / "dscompress" / "bench-venvs")
    ap.add_argument("--work", type=Path, default=HERE / ".work-int4")
    ap.add_argument("--out", type=Path, required=True, help="JSON list of rows, appended to")
    args = ap.parse_args()
    args.work = args.work.resolve()  # the peers run with it as their working directory
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)
    model_dir = resolve(args.model).directory
    tokenizer = load_tokenizer(model_dir)
    window = SplitSpec(samples=args.eval_samples, seq_len=args.seq_len)
    pydoc = Corpus(DataSpec(calibration=SplitSpec(samples=args.samples, seq_len=args.seq_len), eval=window), tokenizer)
    calibration = pydoc.windows("calibration")
    evals = {"pydoc": pydoc.windows("eval")}
    evals["stdlib-docstrings"] = Corpus(DataSpec(source=SPLITS["stdlib-docstrings"], eval=window), tokenizer).windows(
        "eval"
    )
    save_file(
        {"calibration": calibration, **{f"eval_{k}": v for k, v in evals.items()}},
        str(args.work / "windows.safetensors"),
    )  # what the peers read
    refs, base = {}, {}
    fp32 = load_model(model_dir)
    for split, windows in evals.items():
        (args.work / split).mkdir(exist_ok=True)
        base[split] = compute_baseline(fp32, windows, 4, torch.device("cpu"), args.work / split)
        refs[split] = BaselineRef(args.work / split)
    del fp32
    common = {"model": args.model, "symmetric": args.symmetric, "calibration": f"pydoc {args.samples} x {args.seq_len}",
              "eval_windows": f"{args.eval_samples} x {args.seq_len}", "date": time.strftime("%Y-%m-%d"),
              "machine": f"{platform.node()} {os.cpu_count()} cores (CPU)", "command": " ".join(sys.argv)}  # fmt: skip
    rows = []
    for gs in map(int, args.group_sizes.split(",")):
        if "dscompress" in args.tools:
            for method in args.methods.split(","):
                model, seconds, size = ours(method, model_dir, calibration, gs, args.symmetric)
                for split, windows in evals.items():
                    m = evaluate(model, windows, refs[split], 4, torch.device("cpu"))
                    row = _row(common, "dscompress", method, gs, split, m, base[split], seconds)
                    rows.append(row | {"deployed_mb": round(size / 1e6, 1)})
        if "nncf" in args.tools:
            rows += nncf_rows(args, common, model_dir, calibration, evals, base, gs)
        if "llmcompressor" in args.tools:
            rows += llmc_rows(args, common, model_dir, (evals, refs, base), gs)
        _save(args.out, rows)
        rows = []


def llmc_rows(args, common: dict, model_dir: Path, scoring: tuple, gs: int) -> list[dict]:
    """llm-compressor 0.14's GPTQModifier (peers/llmcompressor_worker.py) on the same calibration windows; its
    compressed-tensors checkpoint is read back through dscompress' importer and scored here on every split."""
    evals, refs, base = scoring
    python = overlay_venv(args.venv_root / "llmcompressor", LLMC)
    tag = f"llmcompressor-g{gs}"
    job = {"tag": tag, "model": str(model_dir), "windows": str(args.work / "windows.safetensors"), "bits": 4,
           "sym": args.symmetric, "group_size": gs, "output": str(args.work / tag)}  # fmt: skip
    result = run_worker(python, "llmcompressor_worker.py", job, args.work)
    if "error" in result:
        return [{**common, "tool": "llmcompressor", "method": "gptq", "group_size": gs, "error": result["error"]}]
    model = load_model(resolve(str(args.work / tag)).directory)
    return [
        _row(common, "llmcompressor", "gptq", gs, split, evaluate(model, w, refs[split], 4, torch.device("cpu")),
             base[split], result["seconds"])
        for split, w in evals.items()
    ]  # fmt: skip


def nncf_rows(args, common: dict, model_dir: Path, calibration, evals: dict, base: dict, gs: int) -> list[dict]:
    windows = args.work / "windows.safetensors"
    python = overlay_venv(args.venv_root / "nncf", NNCF)
    baselines = {split: str(args.work / split / "baseline_logprobs.safetensors") for split in evals}
    job = {"tag": f"nncf-g{gs}", "model": str(model_dir), "windows": str(windows), "sym": args.symmetric,
           "group_size": gs, "baselines": baselines}  # fmt: skip
    result = run_worker(python, "nncf_int4_worker.py", job, args.work)
    if "error" in result:
        return [{**common, "tool": "nncf", "method": METHOD, "group_size": gs, "error": result["error"]}]
    return [
        _row(common, "nncf", METHOD, gs, split, m, base[split], result["seconds"])
        for split, m in result["splits"].items()
    ]


def _row(common: dict, tool: str, method: str, gs: int, split: str, m: dict, base: dict, seconds: float) -> dict:
    return {**common, "tool": tool, "method": method, "group_size": gs, "split": split,
            "ppl": round(m["perplexity"], 4), "baseline_ppl": round(base["perplexity"], 4),
            "ppl_change_pct": round(100 * (m["perplexity"] / base["perplexity"] - 1), 2),
            "kl": round(m["kl"], 5), "top1": round(m["top1"], 4), "seconds": round(seconds, 1)}  # fmt: skip


def _save(out: Path, rows: list[dict]) -> None:
    existing = json.loads(out.read_text()) if out.exists() else []
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}")
    tmp.write_text(json.dumps(existing + rows, indent=2) + "\n")
    tmp.replace(out)
    for r in rows:
        print(json.dumps({k: r.get(k) for k in ("tool", "method", "group_size", "split", "ppl", "kl", "top1")}))


if __name__ == "__main__":
    main()
