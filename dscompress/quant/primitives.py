"""Pure tensor maths for group-wise integer weight quantization.

Convention (the GPTQ one, so checkpoints convert without re-rounding):
    codes q are unsigned in [0, 2**bits - 1];  w ~= (q - zero) * scale
    symmetric:  scale = 2 * max|w| / (2**bits - 1), zero = 2**(bits - 1)
    asymmetric: the range [min(w, 0), max(w, 0)] maps onto [0, 2**bits - 1], zero is an integer code.
Weights are 2-D (out, in) or 3-D stacked experts (E, out, in); groups always run along `in` (the last dim).
`group_size == -1` means one group per row (per output channel).
"""

from __future__ import annotations

import torch


def max_code(bits: int) -> int:
    return (1 << bits) - 1


def n_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else in_features // group_size


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """(..., in) -> (..., G, group) in float32; `in` must be a multiple of group_size."""
    gs = w.shape[-1] if group_size == -1 else group_size
    assert w.shape[-1] % gs == 0, f"in_features {w.shape[-1]} is not a multiple of group size {gs}"
    return w.float().reshape(*w.shape[:-1], w.shape[-1] // gs, gs)


def minmax_qparams(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool, shrink: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest scales and zero points over each group's range (times `shrink`: values past the shrunk
    range clip). Returns scale (..., G) float32 and zero (..., G) int32.

    >>> s, z = minmax_qparams(torch.tensor([[-1.0, 0.5, 1.0, 0.0]]), bits=4, group_size=-1, symmetric=True)
    >>> z.item(), round(s.item(), 4)
    (8, 0.1333)
    """
    wg = _grouped(w, group_size)  # (..., G, gs)
    maxq = max_code(bits)
    if symmetric:
        amax = wg.abs().amax(dim=-1) * shrink
        scale = 2.0 * amax / maxq
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        wmin = wg.amin(dim=-1).clamp(max=0.0) * shrink
        wmax = wg.amax(dim=-1).clamp(min=0.0) * shrink
        scale = (wmax - wmin) / maxq
        zero = torch.round(-wmin / torch.where(scale == 0, 1.0, scale)).clamp(0, maxq)
    # Scales are kept float16-representable: GPTQ and compressed-tensors checkpoints store them in 16 bits, and
    # exporting must not move a single weight. An all-zero (or sub-float16) group gets scale 1: it rounds to 0.
    scale = scale.half().float()
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return scale, zero.to(torch.int32)


CLIP_GRID = tuple(round(1.0 - 0.025 * i, 3) for i in range(1, 17))  # shrinks tried after 1.0: 0.975 ... 0.6


def searched_qparams(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool, importance: torch.Tensor, chunk: int = 1 << 24
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the clipped range (shrink 1.0 down to 0.6 of min-max) whose grid rounds `w` with the smallest
    squared error weighted by `importance` (..., in) (GPTQ passes diag(H): how much each input column carries).
    The weighted MSE search of the GPTQ reference's `Quantizer(mse=True)` and of AWQ's clip search, with the
    Hessian diagonal as the weight. Same return as `minmax_qparams`; never a larger weighted error than it.
    Rows are searched `chunk` elements at a time, so the temporaries stay small beside a stack of experts."""
    rows = w.reshape(-1, w.shape[-1])
    imp = importance.clamp(min=0).expand_as(w).reshape(rows.shape)
    step = max(1, chunk // rows.shape[1])
    parts = [_search_rows(rows[i : i + step], imp[i : i + step], bits, group_size, symmetric)
             for i in range(0, rows.shape[0], step)]  # fmt: skip
    scale, zero = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return scale.reshape(*w.shape[:-1], -1), zero.reshape(*w.shape[:-1], -1)


def _search_rows(w, importance, bits: int, group_size: int, symmetric: bool):
    wg, imp = _grouped(w, group_size), _grouped(importance, group_size)

    def error(scale, zero):
        q = (torch.round(wg / scale.unsqueeze(-1)) + zero.unsqueeze(-1).float()).clamp(0, max_code(bits))
        return (((q - zero.unsqueeze(-1).float()) * scale.unsqueeze(-1) - wg).square() * imp).sum(-1)

    best_s, best_z = minmax_qparams(w, bits, group_size, symmetric)
    best = error(best_s, best_z)
    for shrink in CLIP_GRID:
        s, z = minmax_qparams(w, bits, group_size, symmetric, shrink)
        err = error(s, z)
        better = err < best
        best_s, best_z, best = torch.where(better, s, best_s), torch.where(better, z, best_z), torch.minimum(err, best)
    return best_s, best_z


def quantize_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """Integer codes (..., in) as uint8, given per-group scale/zero (..., G)."""
    wg = _grouped(w, group_size)
    q = torch.round(wg / scale.unsqueeze(-1)) + zero.unsqueeze(-1).float()
    return q.clamp(0, max_code(bits)).to(torch.uint8).reshape(w.shape)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """Float32 weights (..., in) from codes and per-group scale/zero (..., G)."""
    qg = _grouped(q, group_size)
    w = (qg - zero.unsqueeze(-1).float()) * scale.unsqueeze(-1)
    return w.reshape(q.shape)


def fake_quantize(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RTN in one call: returns (dequantized float32 weight, scale, zero)."""
    scale, zero = minmax_qparams(w, bits, group_size, symmetric)
    q = quantize_codes(w, scale, zero, bits, group_size)
    return dequantize_codes(q, scale, zero, group_size), scale, zero


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (higher is better)."""
    ref = reference.double()
    noise = (ref - approx.double()).pow(2).sum()
    return float(10 * torch.log10(ref.pow(2).sum() / noise.clamp_min(1e-300)))
