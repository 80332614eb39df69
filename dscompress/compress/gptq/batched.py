"""GPTQ for a batch of same-shaped matrices at once (the routed experts of one MoE layer): the same algorithm as
math.py's `gptq_quantize`, with every per-column step applied to all matrices in one kernel.

The column loop is the cost of GPTQ on a GPU: about six small kernels per input column. Solving E experts one by
one launches E times as many; here one launch serves the whole batch, so a 256-expert layer pays for one matrix's
launches. Static groups only (act-order `static`, or per-channel grids), the default of the pass; other modes go
through `gptq_quantize` one matrix at a time. Results agree with `gptq_quantize` up to float summation order.
"""

from __future__ import annotations

import torch

from dscompress.compress.gptq import fused
from dscompress.compress.gptq.math import GPTQResult, inverse_hessian_factor, visiting_order
from dscompress.quant.primitives import fake_quantize, max_code, minmax_qparams, searched_qparams


def batchable(act_order, group_size: int) -> bool:
    """Whether `gptq_quantize_batched` handles these settings (static grids)."""
    return act_order in (True, "static") or group_size == -1


def gptq_quantize_batched(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    damp_frac: float = 0.01,
    act_order: bool | str = True,
    block_size: int = 128,
    kernel: str = "auto",
    clip_search: bool = False,
) -> list[GPTQResult]:
    """Quantize W (E, out, in) against H (E, in, in); one GPTQResult per matrix. H is consumed."""
    assert batchable(act_order, group_size), "batched GPTQ needs static groups"
    W, H = W.float().clone(), H.float()
    E, out_f, in_f = W.shape
    gs = in_f if group_size == -1 else group_size
    diag = H.diagonal(dim1=1, dim2=2)
    dead = diag == 0
    diag.masked_fill_(dead, 1.0)
    W.masked_fill_(dead[:, None, :], 0.0)
    if clip_search:  # (E, out, G): from the unmodified weights
        scale, zero = searched_qparams(W, bits, group_size, sym, diag[:, None, :])
    else:
        scale, zero = minmax_qparams(W, bits, group_size, sym)
    if act_order:
        perm = torch.stack([visiting_order(d, gs, "static") for d in H.diagonal(dim1=1, dim2=2)])
    else:
        perm = torch.arange(in_f, device=W.device).expand(E, in_f)
    W = torch.gather(W, 2, perm[:, None, :].expand(E, out_f, in_f))
    H = torch.gather(
        torch.gather(H, 1, perm[:, :, None].expand(E, in_f, in_f)), 2, perm[:, None, :].expand(E, in_f, in_f)
    )
    Hinv, damp, ok = _inverse_factors(H, damp_frac)
    del H
    g_idx = (torch.arange(in_f, device=W.device) // gs).to(torch.int32)
    back = torch.argsort(perm, dim=1)
    Q, loss = solve_static(W, Hinv, perm // gs, scale, zero, bits, block_size, kernel)
    Q = torch.gather(Q, 2, back[:, None, :].expand_as(Q))
    results = []
    for e in range(E):
        if ok[e]:
            results.append(GPTQResult(Q[e], scale[e], zero[e], g_idx, float(damp[e]), float(loss[e])))
        else:  # never positive definite: round-to-nearest, as gptq_quantize does
            deq, s, z = fake_quantize(torch.gather(W[e], 1, back[e].expand(out_f, in_f)), bits, group_size, sym)
            results.append(GPTQResult(deq, s, z, g_idx, -1.0, float("nan")))
    return results


def _inverse_factors(H: torch.Tensor, damp_frac: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Upper Cholesky factors of (H + damp I)^-1 for the batch: (factors, damp used, positive definite). Matrices
    that fail at `damp_frac` get math.py's retries with more dampening, one by one."""
    mean_diag = H.diagonal(dim1=1, dim2=2).mean(1)
    work = H.clone()
    work.diagonal(dim1=1, dim2=2).add_((damp_frac * mean_diag)[:, None])
    L, info = torch.linalg.cholesky_ex(work)
    del work
    U, info2 = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    del L
    damp = torch.full((H.shape[0],), damp_frac, dtype=torch.float64)
    ok = torch.ones(H.shape[0], dtype=torch.bool)
    for e in ((info != 0) | (info2 != 0)).nonzero().flatten().tolist():
        factor = inverse_hessian_factor(H[e], damp_frac)
        if factor is None:
            ok[e], damp[e] = False, -1.0
            U[e] = torch.eye(H.shape[1], device=H.device)  # any valid factor: its solve is discarded
        else:
            U[e], damp[e] = factor
    return U, damp, ok


def solve_static(W, Hinv, col_group, scale, zero, bits: int, block_size: int, kernel: str = "auto"):
    """The lazy-batch column loop of math._solve for static grids, over a batch of matrices. W (E, out, in) and
    Hinv (E, in, in) are in visiting order; col_group (E, in) is each visited column's group; scale and zero
    (E, out, G). kernel "auto" runs fused.py's one-launch-per-block kernel where it can (CUDA with Triton),
    "torch" always the eager loop. Returns Q (E, out, in) in visiting order and the loss per matrix."""
    if kernel == "auto" and fused.available(W.device):
        return fused.solve(W, Hinv, col_group, scale, zero, bits, block_size)
    WT = W.transpose(1, 2).contiguous()  # (E, in, out): a column of W is a contiguous row
    scale_t, zero_t = scale.transpose(1, 2), zero.transpose(1, 2).float()  # (E, G, out)
    return _solve_eager(WT, Hinv, col_group, scale_t, zero_t, bits, block_size)


def _solve_eager(WT, Hinv, col_group, scale_t, zero_t, bits: int, block_size: int):
    maxq = max_code(bits)
    E, in_f, out_f = WT.shape
    QT = torch.empty_like(WT)
    loss = torch.zeros(E, dtype=torch.float64, device=WT.device)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1, Hinv1 = WT[:, i1:i2], Hinv[:, i1:i2, i1:i2]
        diag = Hinv1.diagonal(dim1=1, dim2=2)  # (E, b)
        index = col_group[:, i1:i2, None].expand(E, i2 - i1, out_f)
        S, Z = torch.gather(scale_t, 1, index), torch.gather(zero_t, 1, index)  # (E, b, out)
        lo, hi = -Z * S, (maxq - Z) * S
        H_scaled = Hinv1 / diag[:, :, None]  # row i: Hinv_i,j / Hinv_ii
        Err1 = torch.empty_like(W1)
        for i in range(i2 - i1):
            w = W1[:, i]
            q = torch.div(w, S[:, i], out=QT[:, i1 + i]).round_().mul_(S[:, i]).clamp_(lo[:, i], hi[:, i])
            err = torch.sub(w, q, out=Err1[:, i])
            if i + 1 < i2 - i1:
                W1[:, i + 1 :].baddbmm_(H_scaled[:, i, i + 1 :, None], err[:, None, :], alpha=-1.0)
        Err1.div_(diag[:, :, None])
        loss += Err1.double().pow(2).sum((1, 2))
        if i2 < in_f:
            WT[:, i2:].baddbmm_(Hinv[:, i1:i2, i2:].transpose(1, 2), Err1, alpha=-1.0)
    return QT.transpose(1, 2), loss.cpu()
