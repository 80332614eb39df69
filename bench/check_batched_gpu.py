"""Batched expert solves against one-by-one on the accelerator, at real expert widths: share of identical codes
and the GPTQ loss of each (the float-order noise of batched kernels; on a CPU the two are bit-identical).

    python bench/check_batched_gpu.py --experts 8 --out 2048 --in 7168 --tokens 4096
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dscompress.compress.gptq.batched import gptq_quantize_batched
from dscompress.compress.gptq.math import HessianAccumulator, gptq_quantize


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--out", type=int, default=2048)
    ap.add_argument("--in", dest="in_f", type=int, default=7168)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    dev = torch.device(args.device)
    g = torch.Generator(device=dev).manual_seed(0)
    W = torch.randn(args.experts, args.out, args.in_f, device=dev, generator=g).mul_(0.02).bfloat16()
    H = []
    for _ in range(args.experts):  # heavy-tailed channel scales, like real activations
        acc = HessianAccumulator(args.in_f, dev)
        scales = torch.exp(torch.randn(args.in_f, device=dev, generator=g))
        acc.add(torch.randn(args.tokens, args.in_f, device=dev, generator=g) * scales)
        H.append(acc.H)
    H = torch.stack(H)
    kw = dict(bits=4, group_size=128, sym=True, act_order=True)
    torch.cuda.synchronize() if dev.type == "cuda" else None
    t0 = time.perf_counter()
    one = [gptq_quantize(W[e], H[e].clone(), **kw) for e in range(args.experts)]
    torch.cuda.synchronize() if dev.type == "cuda" else None
    t1 = time.perf_counter()
    many = gptq_quantize_batched(W, H.clone(), **kw)
    torch.cuda.synchronize() if dev.type == "cuda" else None
    t2 = time.perf_counter()
    equal = sum(int((a.weight == b.weight).sum()) for a, b in zip(one, many, strict=True)) / W.numel()
    rel = [abs(a.error - b.error) / a.error for a, b in zip(one, many, strict=True)]
    result = {
        "experts": args.experts, "shape": [args.out, args.in_f], "device": str(dev),
        "card": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "share_identical_weights": equal, "max_relative_loss_difference": max(rel),
        "one_by_one_s": round(t1 - t0, 2), "batched_s": round(t2 - t1, 2), "torch": torch.__version__,
    }  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
