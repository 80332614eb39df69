"""What W8A8 weights buy where an INT8 engine runs: int8 GEMMs against bf16 on the GPU, at the Linear shapes of
the models we ship for, prefill token counts (issue #18, item 4).

For each (model, Linear) shape (K in -> N out) and M tokens, three timings, medians of CUDA-event runs:
- bf16: x (M, K) @ W^T, torch.mm (cuBLAS);
- int8 GEMM alone: torch._int_mm (int8 x int8 -> int32, cuBLASLt IMMA), the ceiling;
- int8 end to end: per-token activation quantization (amax, scale, round, cast) + torch._int_mm + the float
  epilogue (int32 -> float, x per-token scale x per-channel scale, -> bf16), in eager PyTorch (what a W8A8 Linear
  costs without a fused kernel) and under torch.compile(mode="max-autotune-no-cudagraphs") (Inductor fuses the
  quantization and the epilogue and autotunes Triton int8 GEMM templates against cuBLASLt), for --compiled-tokens.
Also checks that the end-to-end output equals the fake-quantized bf16 product within float error.

    python bench/bench_int8_gemm_gpu.py --out bench/results/int8_gemm_gpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

SHAPES = {  # model: {Linear: (in K, out N)}
    "SmolLM2-135M": {"q_proj": (576, 576), "gate_up": (576, 3072), "down_proj": (1536, 576)},
    "Qwen2.5-0.5B": {"q_proj": (896, 896), "gate_up": (896, 9728), "down_proj": (4864, 896)},
    "Qwen2.5-7B": {"q_proj": (3584, 3584), "gate_up": (3584, 37888), "down_proj": (18944, 3584)},
}
TOKENS = (512, 2048, 8192)


def timed(fn, reps: int = 50) -> float:
    """Median milliseconds of `fn` over `reps` CUDA-event timed runs, after warm-up."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def w8a8(x: torch.Tensor, w_t: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """Per-token int8 x, int8 W^T (K, N) column-major, int32 accumulation, float epilogue, bf16 out."""
    s = (x.abs().amax(-1, keepdim=True).float() / 127).clamp_min(1e-8)
    q = torch.round(x.float() / s).to(torch.int8)
    return (torch._int_mm(q, w_t).float() * s * w_scale).to(torch.bfloat16)


torch._dynamo.config.recompile_limit = 256  # one compiled graph per shape
COMPILED = torch.compile(w8a8, mode="max-autotune-no-cudagraphs", dynamic=False)
COMPILED_MM = torch.compile(torch._int_mm, mode="max-autotune-no-cudagraphs", dynamic=False)


def row(model: str, linear: str, k: int, n: int, m: int, compiled: bool) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    w_scale = w.float().abs().amax(1) / 127
    w_q = torch.round(w.float() / w_scale[:, None]).to(torch.int8)
    w_t = w_q.t()  # (K, N) column-major: the layout cuBLASLt's int8 GEMM wants for the second operand
    q_x = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8, generator=g)
    bf16 = timed(lambda: x @ w.t())
    gemm = timed(lambda: torch._int_mm(q_x, w_t))
    full = timed(lambda: w8a8(x, w_t, w_scale))
    s = (x.abs().amax(-1, keepdim=True).float() / 127).clamp_min(1e-8)
    fake = ((torch.round(x.float() / s) * s) @ (w_q.float() * w_scale[:, None]).t()).to(torch.bfloat16)
    err = float((w8a8(x, w_t, w_scale).float() - fake.float()).abs().max() / fake.float().abs().max())
    tflops = 2 * m * k * n / 1e9
    extra = {}
    if compiled:
        extra["int8_gemm_compiled_ms"] = timed(lambda: COMPILED_MM(q_x, w_t))
        extra["int8_w8a8_compiled_ms"] = timed(lambda: COMPILED(x, w_t, w_scale))
        extra["w8a8_compiled_speedup"] = bf16 / extra["int8_w8a8_compiled_ms"]
        extra["gemm_compiled_speedup"] = bf16 / extra["int8_gemm_compiled_ms"]
    return extra | {
        "model": model, "linear": linear, "K": k, "N": n, "M": m,
        "bf16_ms": bf16, "int8_gemm_ms": gemm, "int8_w8a8_eager_ms": full,
        "gemm_speedup": bf16 / gemm, "w8a8_eager_speedup": bf16 / full,
        "bf16_tflops": tflops / bf16, "int8_tops": tflops / gemm, "max_rel_err_vs_fake_quant": err,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("bench/results/int8_gemm_gpu.json"))
    ap.add_argument("--compiled-tokens", type=int, nargs="*", default=[], help="M values also run compiled")
    args = ap.parse_args()
    rows = []
    for model, linears in SHAPES.items():
        for linear, (k, n) in linears.items():
            for m in TOKENS:
                rows.append(row(model, linear, k, n, m, m in args.compiled_tokens))
                r = rows[-1]
                speed = f"gemm {r['gemm_speedup']:.2f}x, w8a8 eager {r['w8a8_eager_speedup']:.2f}x"
                if "w8a8_compiled_speedup" in r:
                    speed += f", compiled gemm {r['gemm_compiled_speedup']:.2f}x w8a8 {r['w8a8_compiled_speedup']:.2f}x"
                err = r["max_rel_err_vs_fake_quant"]
                print(f"{model} {linear} M={m}: bf16 {r['bf16_ms']:.4f} ms, {speed}, err {err:.1e}", flush=True)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.node()}, {torch.cuda.get_device_name()}, torch {torch.__version__}",
        "command": " ".join(sys.argv),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
