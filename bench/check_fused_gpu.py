"""The fused GPTQ block kernel (dscompress/compress/gptq/fused.py) against the eager column loop, on the GPU, at
real widths: time of each solve, share of identical weights and GPTQ's loss of each (float-order noise only).

    python bench/check_fused_gpu.py --out bench/results/gptq_fused_kernel_h200.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dscompress.compress.gptq.batched import gptq_quantize_batched
from dscompress.compress.gptq.math import HessianAccumulator, gptq_quantize

# (name, experts, out, in): Qwen2.5-7B's stacked q/k/v, gate/up and down_proj; DeepSeek-V3 routed experts
CASES = [
    ("qwen2.5-7b qkv", 1, 4608, 3584),
    ("qwen2.5-7b gate+up", 1, 37888, 3584),
    ("qwen2.5-7b down", 1, 3584, 18944),
    ("deepseek-v3 experts gate (8 of 256)", 8, 2048, 7168),
]


def problem(experts: int, out_f: int, in_f: int, tokens: int, dev: torch.device):
    g = torch.Generator(device=dev).manual_seed(0)
    W = torch.randn(experts, out_f, in_f, device=dev, generator=g).mul_(0.02).bfloat16()
    H = []
    for _ in range(experts):  # heavy-tailed channel scales, like real activations
        acc = HessianAccumulator(in_f, dev)
        scales = torch.exp(torch.randn(in_f, device=dev, generator=g))
        for _ in range(tokens // 2048):
            acc.add(torch.randn(2048, in_f, device=dev, generator=g) * scales)
        H.append(acc.H)
    return W, torch.stack(H)


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def solve(W, H, kernel: str):
    kw = dict(bits=4, group_size=128, sym=True, act_order=True, kernel=kernel)
    if W.shape[0] == 1:
        return [gptq_quantize(W[0], H[0].clone(), **kw)]
    return gptq_quantize_batched(W, H.clone(), **kw)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    solve(*problem(1, 256, 256, 2048, dev), "auto")  # compile the kernel once, outside the timings
    for name, experts, out_f, in_f in CASES:
        W, H = problem(experts, out_f, in_f, args.tokens, dev)
        eager, t_eager = timed(lambda W=W, H=H: solve(W, H, "torch"))
        fused, t_fused = timed(lambda W=W, H=H: solve(W, H, "auto"))
        equal = sum(int((a.weight == b.weight).sum()) for a, b in zip(eager, fused, strict=True)) / W.numel()
        rel = max(abs(a.error - b.error) / a.error for a, b in zip(eager, fused, strict=True))
        row = {
            "case": name, "experts": experts, "shape": [out_f, in_f], "card": torch.cuda.get_device_name(dev),
            "eager_s": round(t_eager, 3), "fused_s": round(t_fused, 3), "speedup": round(t_eager / t_fused, 2),
            "share_identical_weights": round(equal, 5), "max_relative_loss_difference": rel,
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        }  # fmt: skip
        print(json.dumps(row), flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
        del W, H, eager, fused
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
