"""GPTQ's inner block loop as one Triton kernel per block of columns (static grids), for CUDA devices.

Why: the eager loop (math._solve, batched._solve_eager) launches about six small kernels per input column, so on
a GPU GPTQ is bound by launch latency (832 k columns, about 5 M launches, for a Qwen2.5-7B shape). Inside a block
the rows of W are independent: each output feature only meets the block's own Hinv rows. So one program holds a
tile of output features x all columns of the block in registers and runs the whole block's column loop there:
quantize column i, store its codes and error, subtract error x Hinv[i, i+1:] / Hinv[i, i] from the later columns.
The lazy-batch update of the columns after the block (one GEMM) stays in torch. One launch per block instead of
about 6 x 128; a batch of matrices (the experts of an MoE layer) is the grid's second axis.

The arithmetic is the eager loop's: w / s correctly rounded (div_rn), rounded half to even (as torch.round),
times s, clamped to [-z * s, (maxq - z) * s]. Summation order inside the rank-1 updates can differ from cuBLAS's,
so results agree with the eager loop up to float order (tests compare them in Triton's CPU interpreter; the GPU
check is bench/check_fused_gpu.py). Static grids only (act-order `static` or per-channel), the pass's default.
"""

from __future__ import annotations

import functools

import torch

from dscompress.quant.primitives import max_code

_BLOCK_O = 32  # output features per program: a 128 x 32 float32 tile is 32 registers a thread with 4 warps


def available(device: torch.device) -> bool:
    """Whether the fused kernel can run on `device`: a CUDA device with Triton importable."""
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def solve_static(WT, Hinv, col_group, scale_t, zero_t, bits: int, block_size: int):
    """The lazy-batch loop for static grids, one kernel launch per block.

    WT (E, in, out) float32 contiguous: the weights transposed, in visiting order (consumed);
    Hinv (E, in, in): upper Cholesky factors of H^-1 in visiting order; col_group (E, in): each visited column's
    group; scale_t, zero_t (E, G, out) float32. Returns QT (E, in, out) and GPTQ's loss per matrix (float64, CPU).
    """
    kernel = _kernel()
    E, in_f, out_f = WT.shape
    G = scale_t.shape[1]
    QT = torch.empty_like(WT)
    loss = torch.zeros(E, dtype=torch.float64, device=WT.device)
    groups = col_group.to(torch.int32).contiguous()
    scale_t, zero_t, Hinv = scale_t.contiguous(), zero_t.float().contiguous(), Hinv.contiguous()
    block_b = 1 << (block_size - 1).bit_length()
    err = torch.empty(E, block_size, out_f, device=WT.device, dtype=torch.float32)
    grid = (-(-out_f // _BLOCK_O), E)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        n = i2 - i1
        err1 = err[:, :n]
        kernel[grid](WT, QT, err, Hinv, scale_t, zero_t, groups, i1, n, in_f, out_f, G, err.stride(0),
                     float(max_code(bits)), BLOCK_B=block_b, BLOCK_O=_BLOCK_O, num_warps=4)  # fmt: skip
        err1.div_(Hinv[:, i1:i2, i1:i2].diagonal(dim1=1, dim2=2)[:, :, None])
        loss += err1.double().pow(2).sum((1, 2))
        if i2 < in_f:
            WT[:, i2:].baddbmm_(Hinv[:, i1:i2, i2:].transpose(1, 2), err1, alpha=-1.0)
    return QT, loss.cpu()


def solve(W, Hinv, col_group, scale, zero, bits: int, block_size: int):
    """`solve_static` on W (E, out, in) and grids (E, out, G) as the solvers hold them: Q (E, out, in) and loss."""
    WT = W.transpose(1, 2).contiguous()  # (E, in, out): a column of W is a contiguous row
    QT, loss = solve_static(WT, Hinv, col_group, scale.transpose(1, 2), zero.transpose(1, 2).float(), bits, block_size)
    return QT.transpose(1, 2), loss


@functools.cache
def _kernel():
    """The jitted kernel, defined on first use: Triton is imported only where the kernel runs."""
    import triton
    import triton.language as tl

    @triton.jit
    def gptq_block(WT, QT, ERR, HINV, SCALE, ZERO, GROUP, i1, n, in_f, out_f, G, err_stride, maxq,
                   BLOCK_B: tl.constexpr, BLOCK_O: tl.constexpr):  # fmt: skip
        e = tl.program_id(1).to(tl.int64)
        o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
        r = tl.arange(0, BLOCK_B)
        omask, rmask = o < out_f, r < n
        w_base = WT + e * in_f * out_f + i1 * out_f
        tile = tl.load(w_base + r[:, None] * out_f + o[None, :], mask=rmask[:, None] & omask[None, :], other=0.0)
        h_base = HINV + e * in_f * in_f + i1 * in_f + i1
        for i in range(n):
            w = tl.sum(tl.where(r[:, None] == i, tile, 0.0), axis=0)  # column i of the block, current values
            g = tl.load(GROUP + e * in_f + i1 + i).to(tl.int64)
            s = tl.load(SCALE + e * G * out_f + g * out_f + o, mask=omask, other=1.0)
            z = tl.load(ZERO + e * G * out_f + g * out_f + o, mask=omask, other=0.0)
            # clamped to 2**22, below which x + 0.5 is exact in float32, so floor(x + 0.5) rounds correctly
            x = tl.minimum(tl.maximum(tl.math.div_rn(w, s), -4194304.0), 4194304.0)
            c = tl.floor(x + 0.5)
            c = tl.where(((c - x) == 0.5) & ((c - 2.0 * tl.floor(c * 0.5)) != 0.0), c - 1.0, c)  # half to even
            q = tl.minimum(tl.maximum(c * s, -z * s), (maxq - z) * s)
            tl.store(QT + e * in_f * out_f + (i1 + i) * out_f + o, q, mask=omask)
            err = w - q
            tl.store(ERR + e * err_stride + i * out_f + o, err, mask=omask)
            d = tl.load(h_base + i * in_f + i)
            h = tl.load(h_base + i * in_f + r, mask=rmask & (r > i), other=0.0) / d
            tile = tile - h[:, None] * err[None, :]

    return gptq_block
