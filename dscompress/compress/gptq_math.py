"""GPTQ for one weight matrix: pure tensor maths, no modules (Frantar et al. 2022, arXiv 2210.17323).

Our own implementation: AutoGPTQ is archived and fails to import on transformers 5, and the solver is the product.
Facts it follows (../shared/REFERENCE.md section 3):
- H = 2 X X^T / n over the calibration tokens (`HessianAccumulator`, a running mean);
- columns with diag(H) = 0 are dead: W = 0 and H = 1 there;
- dampening adds damp_frac * mean(diag H) to the diagonal; Hinv = upper Cholesky factor of H^-1;
- lazy batch updates over blocks of `block_size` columns;
- act-order visits columns by decreasing diag(H); with static groups every group's scale and zero are fixed
  from the unmodified weight in the original column order, so g_idx is the plain `col // group_size` and
  inference needs no permutation.
Quantization grids follow compress/quant.py (w = (q - zero) * scale, q unsigned).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dscompress.compress.quant import max_code, minmax_qparams


class HessianAccumulator:
    """Running mean of 2 X X^T over rows of X, in float32 (float64 would double GPU memory for no gain here)."""

    def __init__(self, in_features: int, device: torch.device):
        self.H = torch.zeros(in_features, in_features, device=device, dtype=torch.float32)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        """x: (..., in) activations feeding the weight."""
        x = x.reshape(-1, x.shape[-1]).float()  # (n, in)
        m = x.shape[0]
        if m == 0:
            return
        self.H *= self.n / (self.n + m)
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.H += x.t() @ x


@dataclass
class GPTQResult:
    weight: torch.Tensor  # (out, in) float32, dequantized, on the grid
    scale: torch.Tensor  # (out, G) float32
    zero: torch.Tensor  # (out, G) int32
    g_idx: torch.Tensor  # (in,) int32, group of each input column
    damp_used: float  # the dampening fraction that made H positive definite (or -1: RTN fallback)
    error: float  # sum over columns of ((w - q)^2 / Hinv_cc^2), GPTQ's loss proxy


def inverse_hessian_factor(H: torch.Tensor, damp_frac: float, retries: int = 6) -> tuple[torch.Tensor, float] | None:
    """Upper Cholesky factor of (H + damp I)^-1, raising damp x10 on failure; None when it never succeeds.

    At most three (in, in) matrices live at once (H, one work copy, one factor): for a 18944-wide down_proj
    that is 4.3 GB, not the 10 GB a naive version takes.
    """
    mean_diag = float(torch.mean(torch.diagonal(H)))
    damp = damp_frac
    for _ in range(retries):
        work = H.clone()
        work.diagonal().add_(damp * mean_diag)
        L, info = torch.linalg.cholesky_ex(work)
        del work
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            del Hinv
            if int(info) == 0:
                return U, damp
        damp = damp * 10.0 if damp > 0 else 1e-3
    return None


def _group_params(W: torch.Tensor, bits: int, group_size: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return minmax_qparams(W, bits, group_size, sym)  # (out, G) each


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    damp_frac: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
) -> GPTQResult:
    """Quantize W (out, in) against Hessian H (in, in). Returns dequantized weights and their grid.

    H is consumed: dead columns and the permutation are applied to it in place (it is large: in x in).

    Without act-order, each group's scale/zero is taken from the (already error-compensated) weights when the
    solver reaches the group's first column, as in the reference. With act-order, groups are static.
    """
    W = W.float().clone()
    H = H.float()
    out_f, in_f = W.shape
    gs = in_f if group_size == -1 else group_size
    assert in_f % gs == 0, f"group size {gs} does not divide in_features {in_f}"  # recipes are checked earlier
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    static = act_order or group_size == -1
    scale = torch.zeros(out_f, in_f // gs, device=W.device)
    zero = torch.zeros(out_f, in_f // gs, device=W.device, dtype=torch.int32)
    if static:
        scale, zero = _group_params(W, bits, group_size, sym)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(in_f, device=W.device)
    if act_order:
        W, H = W[:, perm], H[perm][:, perm]
    factor = inverse_hessian_factor(H, damp_frac)
    del H
    g_idx = (torch.arange(in_f, device=W.device) // gs).to(torch.int32)
    if factor is None:  # never positive definite: fall back to round-to-nearest (reported by the pass)
        from dscompress.compress.quant import fake_quantize

        deq, s, z = fake_quantize(W[:, torch.argsort(perm)], bits, group_size, sym)
        return GPTQResult(deq, s, z, g_idx, -1.0, float("nan"))
    Hinv, damp_used = factor
    if not static:
        assert block_size % gs == 0, f"block size {block_size} must be a multiple of group size {gs}"
    Q, loss = _solve(W, Hinv, perm, scale, zero, bits, gs, sym, static, block_size)
    return GPTQResult(Q[:, torch.argsort(perm)], scale, zero, g_idx, damp_used, loss)


def _solve(W, Hinv, perm, scale, zero, bits, gs, sym, static, block_size):
    """The lazy-batch column loop. W and Hinv are in visiting order; `perm` maps position -> original column."""
    # The column loop is Python, so it is kept to a few in-place kernels per column: this loop is most of
    # GPTQ's time on small models and on GPUs.
    maxq = max_code(bits)
    out_f, in_f = W.shape
    order = perm.tolist()  # on the host once: indexing a device tensor per column would sync every column
    Q = torch.empty_like(W)
    loss = 0.0
    current = -1
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = W[:, i1:i2].clone()  # (out, b)
        Err1 = torch.empty_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        diag = Hinv1.diagonal().tolist()  # one host copy per block
        for i in range(i2 - i1):
            col = order[i1 + i]
            g = col // gs
            if not static and col % gs == 0:  # first column of a group: fix its grid from current weights
                s, z = _group_params(W1[:, i : i + gs], bits, -1, sym)  # the group lies inside this block
                scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
                current = -1
            if g != current:
                s_col, z_col, current = scale[:, g], zero[:, g].float(), g
            w = W1[:, i]
            dq = torch.round(w / s_col).add_(z_col).clamp_(0, maxq).sub_(z_col).mul_(s_col)
            Q[:, i1 + i] = dq
            err = (w - dq).div_(diag[i])
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1.0)
            Err1[:, i] = err
        loss += float(Err1.double().pow(2).sum())
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1.0)
    return Q, loss
