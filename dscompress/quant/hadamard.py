"""Orthogonal rotations that spread activation outliers before int8 quantization (QuaRot, arXiv 2404.00456).

Online rotation of a Linear's input x (width n): the block-diagonal Walsh-Hadamard matrix

    M = I_(n/B) (x) H_a (x) H_b,   B = a * b = the largest power of two dividing n (at most MAX_BLOCK),

with H_k the Sylvester Hadamard matrix of order k scaled by 1/sqrt(k): orthogonal and symmetric, so M^-1 = M and
x @ M = M x. Applied as two small matrix products on x viewed as (..., n/B, a, b): X -> H_a X H_b, which costs
a + b multiply-adds per element instead of B (SmolLM2's down_proj input, 1536 = 3 x 512: 16 + 32 = 48 per element,
against the 576 that down_proj itself spends per input element). In ONNX that is Reshape, MatMul(., H_b),
MatMul(H_a, .), Reshape: standard operators TensorRT's parser takes.

Why block-diagonal: a full Hadamard matrix of order n exists only for n = 1, 2 or a multiple of 4, and for widths
such as Qwen2.5's 4864 = 19 x 256 none is known in closed form (order 76 = 4 x 19 needs a tabulated matrix); the
Kronecker product with a random orthogonal matrix of the odd part would cost n/B times more per element. Blocks
of 256 or more spread a channel outlier over 256+ channels, which is what per-tensor int8 needs.

Offline rotations (folded into weights, free at run time) may be dense: `random_orthogonal_like_hadamard` gives
a random-sign Hadamard matrix for power-of-two widths and, otherwise, H_B (x) Q with Q a seeded random orthogonal
matrix of the odd part (SmolLM2's hidden 576 = 64 x 9, Qwen2.5-0.5B's 896 = 128 x 7).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

MAX_BLOCK = 1024


def sylvester(k: int, dtype=torch.float64) -> torch.Tensor:
    """H_k / sqrt(k), k a power of two: symmetric and orthogonal."""
    if k < 1 or k & (k - 1):
        raise ValueError(f"Sylvester Hadamard matrices have power-of-two orders, not {k}")
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < k:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(k)


def block_factors(width: int) -> tuple[int, int, int]:
    """(block, a, b) of the online rotation for `width`: block = a * b, a <= b, both powers of two."""
    block = min(width & -width, MAX_BLOCK)
    if block < 2:
        raise ValueError(f"width {width} is odd: no Hadamard block divides it")
    a = 1 << (int(math.log2(block)) // 2)
    return block, a, block // a


def rotate(x: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """x @ M along the last dimension (M as in the module docstring; M @ M = I, so this also undoes itself)."""
    shape = x.shape
    ha, hb = _factor(a, x.device), _factor(b, x.device)
    y = x.float().reshape(*shape[:-1], shape[-1] // (a * b), a, b)
    return (ha @ (y @ hb)).reshape(shape).to(x.dtype)


@lru_cache(maxsize=32)
def _factor(k: int, device: torch.device) -> torch.Tensor:
    """sylvester(k) in float32 on `device`, built once: `rotate` runs in forward hooks on every call."""
    return sylvester(k, torch.float32).to(device)


def random_orthogonal_like_hadamard(width: int, seed: int) -> torch.Tensor:
    """A seeded dense orthogonal (width, width) float64 matrix for offline rotation (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    block = width & -width
    signs = torch.randint(0, 2, (width,), generator=g, dtype=torch.float64) * 2 - 1
    h = sylvester(block)
    odd = width // block
    if odd > 1:
        q, r = torch.linalg.qr(torch.randn(odd, odd, generator=g, dtype=torch.float64))
        h = torch.kron(h.contiguous(), (q * torch.sign(torch.diagonal(r))).contiguous())  # Q Haar-distributed
    return signs[:, None] * h
