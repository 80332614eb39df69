"""GPTQ for one weight matrix: pure tensor maths, no modules (Frantar et al. 2022, arXiv 2210.17323).

Our own implementation: AutoGPTQ is archived and fails to import on transformers 5, and the solver is the product.
Facts it follows (docs/DESIGN.md, "GPTQ"):
- H = 2 X X^T / n over the calibration tokens (`HessianAccumulator`, a running mean);
- columns with diag(H) = 0 are dead: W = 0 and H = 1 there;
- dampening adds damp_frac * mean(diag H) to the diagonal; Hinv = upper Cholesky factor of H^-1;
- lazy batch updates over blocks of `block_size` columns;
- act-order visits columns by decreasing diag(H); with static groups every group's scale and zero are fixed
  from the unmodified weight in the original column order, so g_idx is the plain `col // group_size` and
  inference needs no permutation.
Quantization grids follow quant/primitives.py (w = (q - zero) * scale, q unsigned).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dscompress.compress.gptq import fused
from dscompress.quant.primitives import fake_quantize, max_code, minmax_qparams, searched_qparams


class HessianAccumulator:
    """Running mean of 2 X X^T over rows of X, in float32 (float64 would double GPU memory for no gain here).

    With `fast`, bfloat16/float16 activations on a CUDA device are multiplied on tensor cores with float32
    accumulation and output (`out_dtype`): their products are exact in float32, so this is the float32 GEMM's
    arithmetic up to summation order, at several times its speed (the Hessians of a 7B model's down_proj inputs
    are 18944 x 18944). Otherwise the activations are upcast to float32 first.
    """

    def __init__(self, in_features: int, device: torch.device, fast: bool = False):
        self.H = torch.zeros(in_features, in_features, device=device, dtype=torch.float32)
        self.n = 0
        self.fast = fast

    def copy(self) -> HessianAccumulator:
        """An accumulator with its own copy of H (a solve consumes the Hessian it is given)."""
        twin = HessianAccumulator.__new__(HessianAccumulator)
        twin.H, twin.n, twin.fast = self.H.clone(), self.n, self.fast
        return twin

    def add(self, x: torch.Tensor) -> None:
        """x: (..., in) activations feeding the weight."""
        x = x.reshape(-1, x.shape[-1])  # (n, in)
        if not (self.fast and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)):
            x = x.float()
        m = x.shape[0]
        if m == 0:
            return
        keep = self.n / (self.n + m)
        self.n += m
        symmetric_rank_update(self.H, x, beta=keep, alpha=2.0 / self.n)


def symmetric_rank_update(H: torch.Tensor, x: torch.Tensor, beta: float, alpha: float, parts: int = 3) -> None:
    """H = beta * H + alpha * x^T x, computing only the blocks on and above the diagonal (BLAS syrk, which torch
    does not expose): with 3 column blocks that is 6 of 9 products, about 30% less time for the widest inputs.
    x is float32, or half precision on CUDA (multiplied into float32: see HessianAccumulator)."""
    d = H.shape[0]
    if d < 512:  # small: one product is faster than several
        _addmm(H, x, x, beta, alpha)
        return
    edges = [d * i // parts for i in range(parts + 1)]
    for a, b in zip(edges, edges[1:], strict=False):
        _addmm(H[a:b, a:], x[:, a:b], x[:, a:], beta, alpha)
    for a, b in zip(edges[1:], edges[2:], strict=False):
        H[a:b, :a] = H[:a, a:b].t()


def _addmm(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float, alpha: float) -> None:
    """out = beta * out + alpha * a^T b, in float32 whatever a's and b's precision."""
    if a.dtype == torch.float32:
        out.addmm_(a.t(), b, beta=beta, alpha=alpha)
    else:
        product = torch.mm(a.t(), b, out_dtype=torch.float32)
        out.mul_(beta).add_(product, alpha=alpha)


@dataclass
class GPTQResult:
    weight: torch.Tensor  # (out, in) float32, dequantized, on the grid
    scale: torch.Tensor  # (out, G) float32
    zero: torch.Tensor  # (out, G) int32
    g_idx: torch.Tensor  # (in,) int32, group of each input column
    damp_used: float  # the dampening fraction that made H positive definite (or -1: RTN fallback)
    error: float  # sum over columns of ((w - q)^2 / Hinv_cc^2), GPTQ's loss proxy


def inverse_hessian_factor(H: torch.Tensor, damp_frac: float, retries: int = 6, flipped: bool = False
                           ) -> tuple[torch.Tensor, float] | None:  # fmt: skip
    """Upper Cholesky factor U of (H + damp I)^-1 (H^-1 = U^T U), raising damp x10 on failure; None when it
    never succeeds.

    H^-1 is never formed: with J the reversal of rows and columns, J H J = M M^T (M lower triangular) gives
    H^-1 = (J M^-T J)(J M^-1 J), and U = J M^-1 J is upper triangular with a positive diagonal: the factor itself.
    So one Cholesky and one in-place triangular inverse replace Cholesky, inverse and a second Cholesky, and at
    most two (in, in) matrices live at once (for an 18944-wide down_proj: 2.9 GB where cholesky_inverse on CUDA
    took four). `flipped`: H is given as J H J (the caller permuted it so, for free) and is consumed (its storage
    ends as M^-1); otherwise H is left as it was. A failed attempt restores the diagonal, so retries need no copy.
    """
    if not flipped:
        H = H.flip((0, 1))
    diag = H.diagonal().clone()
    mean_diag = float(torch.mean(diag))
    damp = damp_frac
    for _ in range(retries):
        H.diagonal().copy_(diag + damp * mean_diag)
        M, info = torch.linalg.cholesky_ex(H)
        if int(info) == 0:
            H.zero_().diagonal().fill_(1.0)  # H's storage becomes the identity, then M^-1
            torch.linalg.solve_triangular(M, H, upper=False, out=H)
            del M
            return H.flip((0, 1)), damp
        del M
        damp = damp * 10.0 if damp > 0 else 1e-3
    return None


def _group_params(
    W: torch.Tensor, bits: int, group_size: int, sym: bool, importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, G) scales and zeros: min-max, or with `importance` (diag H) each group's searched clipping."""
    if importance is None:
        return minmax_qparams(W, bits, group_size, sym)
    return searched_qparams(W, bits, group_size, sym, importance)


def visiting_order(diag: torch.Tensor, gs: int, act_order) -> torch.Tensor:
    """The order GPTQ visits columns in: position -> column.

    - False: left to right;
    - "static": by decreasing Hessian diagonal (the most salient columns first, while every other column can
      still absorb their error); each group's grid is fixed beforehand from the unmodified weights;
    - "group": group-aware: whole groups by decreasing largest diagonal, and inside each group by decreasing
      diagonal. Groups stay contiguous in the visit, so each grid is still taken from the error-compensated
      weights when the solver reaches the group, as without act-order.
    Either way the checkpoint keeps the plain g_idx = column // group_size.
    """
    n = diag.shape[0]
    if not act_order:
        return torch.arange(n, device=diag.device)
    if act_order == "static":
        return torch.argsort(diag, descending=True)
    per_group = diag.reshape(n // gs, gs)
    groups = torch.argsort(per_group.amax(1), descending=True)
    inside = torch.argsort(per_group, dim=1, descending=True)
    return (groups.unsqueeze(1) * gs + inside[groups]).reshape(-1)


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor | HessianAccumulator,
    bits: int,
    group_size: int,
    sym: bool,
    damp_frac: float = 0.01,
    act_order: bool | str = False,
    block_size: int = 128,
    kernel: str = "auto",
    clip_search: bool = False,
) -> GPTQResult:
    """Quantize W (out, in) against Hessian H (in, in). Returns dequantized weights and their grid.

    H is consumed (it is large: in x in): dead columns are set in place and its storage ends as H^-1. Given the
    accumulator itself, the solve takes its Hessian (acc.H becomes None), so the original is freed as soon as the
    permuted copy exists: two in x in matrices at most.

    Without act-order, each group's scale/zero is taken from the (already error-compensated) weights when the
    solver reaches the group's first column, as in the reference. With act-order, groups are static, and
    kernel "auto" solves them with fused.py's one-launch-per-block kernel where it can run (CUDA with Triton).
    `clip_search` (static grids): each group's range is clipped where the diag(H)-weighted rounding error is least.
    """
    act_order = "static" if act_order is True else act_order
    if isinstance(H, HessianAccumulator):
        acc = H
        H, acc.H = acc.H, None
    W = W.to(torch.float32, copy=True)
    H = H.float()
    out_f, in_f = W.shape
    gs = in_f if group_size == -1 else group_size
    assert in_f % gs == 0, f"group size {gs} does not divide in_features {in_f}"  # recipes are checked earlier
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    static = act_order == "static" or group_size == -1
    scale = torch.zeros(out_f, in_f // gs, device=W.device)
    zero = torch.zeros(out_f, in_f // gs, device=W.device, dtype=torch.int32)
    if static:
        scale, zero = _group_params(W, bits, group_size, sym, torch.diag(H) if clip_search else None)
    perm = visiting_order(torch.diag(H), gs, act_order)
    if act_order:
        W = W[:, perm]
    back = perm.flip(0)  # H in reversed visiting order (J H J, see inverse_hessian_factor), one copy at a time
    H = H[back]
    H = H[:, back]
    factor = inverse_hessian_factor(H, damp_frac, flipped=True)
    del H
    g_idx = (torch.arange(in_f, device=W.device) // gs).to(torch.int32)
    if factor is None:  # never positive definite: fall back to round-to-nearest (reported by the pass)
        deq, s, z = fake_quantize(W[:, torch.argsort(perm)], bits, group_size, sym)
        return GPTQResult(deq, s, z, g_idx, -1.0, float("nan"))
    Hinv, damp_used = factor
    if not static:
        assert block_size % gs == 0, f"block size {block_size} must be a multiple of group size {gs}"
    if static and kernel == "auto" and fused.available(W.device):
        Q, losses = fused.solve(W[None], Hinv[None], (perm // gs)[None], scale[None], zero[None], bits, block_size)
        Q, loss = Q[0], float(losses[0])
    else:
        Q, loss = _solve(W, Hinv, perm, scale, zero, bits, gs, sym, static, block_size)
    return GPTQResult(Q[:, torch.argsort(perm)], scale, zero, g_idx, damp_used, loss)


def _solve(W, Hinv, perm, scale, zero, bits, gs, sym, static, block_size):
    """The lazy-batch column loop. W and Hinv are in visiting order; `perm` maps position -> original column.

    The loop is Python, one iteration per input column, which is most of GPTQ's time on small models and on GPUs,
    so each column costs six kernels on contiguous memory and no indexing: weights are held transposed (a column
    of W is a contiguous row), and each block's rows, scales and bounds are split into views once. A column
    quantizes as clamp(round(w / s) * s, -zero * s, (maxq - zero) * s), which equals (clamp(round(w / s) + zero,
    0, maxq) - zero) * s exactly (s > 0); its error (w - q) is scaled by 1 / Hinv_ii inside the update and once per
    block for the lazy batch update.
    """
    maxq = max_code(bits)
    out_f, in_f = W.shape
    WT = W.t().contiguous()  # (in, out)
    QT = torch.empty_like(WT)
    order = perm.tolist()  # on the host once: indexing a device tensor per column would sync every column
    col_group = perm // gs
    loss = 0.0
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1, Hinv1 = WT[i1:i2], Hinv[i1:i2, i1:i2]
        Err1 = torch.empty_like(W1)
        diag = Hinv1.diagonal()
        inv_diag = (1.0 / diag).tolist()  # one host copy per block
        if static:  # (b, out): the grid of each column of the block
            S = scale.t()[col_group[i1:i2]]
            Z = zero.t()[col_group[i1:i2]].float()
            lo, hi = -Z * S, (maxq - Z) * S
        else:
            S, lo, hi = torch.empty_like(W1), torch.empty_like(W1), torch.empty_like(W1)
        rows, q_rows, e_rows, h_rows = W1.unbind(0), QT[i1:i2].unbind(0), Err1.unbind(0), Hinv1.unbind(0)
        s_rows, lo_rows, hi_rows = S.unbind(0), lo.unbind(0), hi.unbind(0)
        for i, w in enumerate(rows):
            if not static and (i1 + i) % gs == 0:  # a group's first column: its grid from current weights
                _group_start(W1[i : i + gs], order[i1 + i] // gs, scale, zero, S[i : i + gs], lo[i : i + gs],
                             hi[i : i + gs], bits, sym)  # fmt: skip
            s_col = s_rows[i]
            q = torch.div(w, s_col, out=q_rows[i]).round_().mul_(s_col).clamp_(lo_rows[i], hi_rows[i])
            err = torch.sub(w, q, out=e_rows[i])
            W1[i + 1 :].addr_(h_rows[i][i + 1 :], err, alpha=-inv_diag[i])
        Err1.div_(diag.unsqueeze(1))
        loss += float(Err1.double().pow(2).sum())
        WT[i2:].addmm_(Hinv[i1:i2, i2:].t(), Err1, alpha=-1.0)
    return QT.t(), loss


def _group_start(rows, g, scale, zero, S, lo, hi, bits: int, sym: bool) -> None:
    """Dynamic groups (no or group-aware act-order): group g's grid from its current, error-compensated weights."""
    s, z = _group_params(rows.t(), bits, -1, sym)  # (out, 1) each; the group lies inside this block
    scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
    S.copy_(s[:, 0].expand_as(S))
    lo.copy_((-z[:, 0].float() * s[:, 0]).expand_as(lo))
    hi.copy_(((max_code(bits) - z[:, 0].float()) * s[:, 0]).expand_as(hi))
