"""Streaming activation observers (statistics only, never activations) and the KL threshold search.

`AbsHistogram` keeps a 2048-bin histogram of |x|, the running min and max, and a sample count. Its range starts at
the first batch's max|x| (or at an expected max given up front, just above it) and grows by doubling when a larger value
arrives: pairs of bins merge exactly, so growth never re-distributes counts by guesswork.

`kl_threshold` is TensorRT's entropy calibration (Migacz, GTC 2017; docs/DESIGN.md, "KL (entropy) calibration"),
for every candidate at once: a (candidates x bins) computation, no Python loop over candidates.
"""

from __future__ import annotations

import math

import torch

NUM_BINS = 2048
QUANT_LEVELS = 128  # int8 symmetric: 128 levels on each side of zero
FIRST_CANDIDATE = 128


class AbsHistogram:
    """Running 2048-bin histogram of |x| with a growing range, plus min, max and count."""

    def __init__(self, bins: int = NUM_BINS):
        self.bins = bins
        self.counts: torch.Tensor | None = None  # float64 (bins,), on the observed tensor's device until .cpu()
        self.range = 0.0  # the histogram covers [0, range]
        self.min = math.inf
        self.max = -math.inf
        self.count = 0

    @property
    def amax(self) -> float:
        return max(abs(self.min), abs(self.max)) if self.count else 0.0

    @property
    def width(self) -> float:
        return self.range / self.bins

    def expect(self, amax: float) -> None:
        """Set the range before the first update (when max|x| over all data is known): no growth later."""
        assert self.counts is None, "expect() must come before the first update()"
        self.range = self._cover(float(amax))

    def _cover(self, amax: float) -> float:
        """A range just above amax, so every value lies strictly inside it and doubling merges bins exactly."""
        return amax * (1.0 + 1.0 / self.bins) if amax > 0 else 1.0

    def _grow(self, amax: float) -> None:
        doublings = max(1, math.ceil(math.log2(amax / self.range)))
        factor = 1 << doublings
        if factor >= self.bins:  # everything so far lands in bin 0 of the new range
            merged = torch.zeros_like(self.counts)
            merged[0] = self.counts.sum()
        else:
            merged = self.counts.view(self.bins // factor, factor).sum(-1)
            merged = torch.cat([merged, torch.zeros(self.bins - len(merged), dtype=merged.dtype, device=merged.device)])
        self.counts = merged
        self.range *= factor
        while self.range <= amax:  # float round-off
            self.range *= 2.0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach()
        if x.numel() == 0:
            return
        lo, hi = torch.aminmax(x.float())
        self.min, self.max = min(self.min, float(lo)), max(self.max, float(hi))
        self.count += x.numel()
        amax = max(abs(float(lo)), abs(float(hi)))
        if self.counts is None:
            self.counts = torch.zeros(self.bins, dtype=torch.float64, device=x.device)
            if self.range <= 0.0:
                self.range = self._cover(amax)
        elif amax >= self.range:
            self._grow(amax)
        # Dividing by the width (range / 2**k) keeps growth exact: halving a float quotient is exact.
        idx = (x.abs().float().flatten() / self.width).long().clamp_(max=self.bins - 1)
        self.counts += torch.bincount(idx, minlength=self.bins).to(self.counts.dtype)

    def percentile(self, pct: float) -> float:
        """The |x| below which `pct` percent of the samples lie, at bin resolution (upper bin edge)."""
        cdf = self.counts.cumsum(0) / self.counts.sum()
        index = int(torch.searchsorted(cdf, torch.tensor(pct / 100.0, dtype=cdf.dtype, device=cdf.device)))
        return min(index + 1, self.bins) * self.width

    def threshold(self, method: str, pct: float = 99.99) -> float:
        """The activation clipping range for `method`: kl, minmax or percentile."""
        if self.count == 0:
            raise ValueError("observer saw no data")
        if method == "minmax":
            return self.amax
        if method == "percentile":
            return min(self.percentile(pct), self.amax)
        return min(kl_threshold(self.counts.cpu())[0] * self.width, self.amax)


def kl_divergences(hist: torch.Tensor, levels: int = QUANT_LEVELS, first: int = FIRST_CANDIDATE) -> torch.Tensor:
    """KL(P_i || Q_i) for every candidate cutoff i in [first, len(hist)]; inf where Q misses mass P has.

    P_i: bins [0, i) with every count at or beyond i folded into bin i-1.
    Q_i: bins [0, i) (without the outliers) merged into `levels` levels (bin j -> level floor(j * levels / i)),
    each level's mass spread evenly over its non-empty bins.

    Level l of candidate i is the contiguous run of bins [ceil(l i / levels), ceil((l + 1) i / levels)), so every
    sum the definition needs is a difference of prefix sums, and with p the counts and q_l the mass per
    non-empty bin of level l:
        KL_i = (sum_j p_j log p_j - sum_l (mass of P in level l) log q_l) / sum(P) - log sum(P) + log sum(Q).
    That is (candidates x levels) work instead of (candidates x bins).
    """
    h = hist.double().cpu()
    n = len(h)
    zero = torch.zeros(1, dtype=torch.float64)
    cum = torch.cat([zero, torch.cumsum(h, 0)])  # cum[k] = sum of bins [0, k)
    cum_nz = torch.cat([zero, torch.cumsum((h > 0).double(), 0)])
    hlogh = torch.where(h > 0, h * torch.log(torch.where(h > 0, h, 1.0)), 0.0)
    cum_hlogh = torch.cat([zero, torch.cumsum(hlogh, 0)])
    cands = torch.arange(first, n + 1, dtype=torch.long)  # (C,)
    edges = (torch.arange(levels + 1)[None, :] * cands[:, None] + levels - 1) // levels  # (C, levels + 1)
    mass = cum[edges[:, 1:]] - cum[edges[:, :-1]]  # (C, levels): Q's mass per level (no outliers)
    nonempty = cum_nz[edges[:, 1:]] - cum_nz[edges[:, :-1]]
    total = cum[-1]
    kept = cum[cands]  # sum(Q) = counts below i
    outliers = total - kept
    last = h[cands - 1]
    p_last = last + outliers  # P's last bin
    plogp = cum_hlogh[cands - 1] + torch.where(p_last > 0, p_last * torch.log(p_last.clamp_min(1e-300)), 0.0)
    p_mass = mass.clone()
    p_mass[:, -1] += outliers
    log_q = torch.log((mass / nonempty.clamp_min(1.0)).clamp_min(1e-300))
    cross = torch.where(p_mass > 0, p_mass * log_q, 0.0).sum(1)
    div = (plogp - cross) / total - math.log(float(total)) + torch.log(kept.clamp_min(1e-300))
    missing = (last == 0) & (outliers > 0)  # P has mass in bin i-1 where Q has none
    return torch.where(missing | (kept == 0), math.inf, div.clamp_min(0.0))


def kl_threshold(hist: torch.Tensor, levels: int = QUANT_LEVELS, first: int = FIRST_CANDIDATE) -> tuple[float, int]:
    """(threshold in bins, chosen cutoff i): the smallest i minimizing KL(P_i || Q_i); threshold = i + 0.5.

    A histogram with every count below bin `first` keeps its whole range (nothing to clip).
    """
    if len(hist) < first or float(hist[first - 1 :].sum()) == 0.0:
        return float(len(hist)), len(hist)
    div = kl_divergences(hist, levels, first)
    best = int(torch.argmin(div))
    cutoff = first + best
    return min(cutoff + 0.5, float(len(hist))), cutoff
