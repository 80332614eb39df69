"""AWQ scaling before the GPTQ solve (Lin et al. 2023, arXiv 2306.00978): per activation site (compress/sites.py:
the Linears reading one tensor, whose producer can absorb a per-channel division), the channels the inputs use
most are scaled up in the weights before they are quantized, and the inputs divided by the same factor in the
producer, so the float block computes what it did and the salient channels lose less to rounding.

For the inputs X of a site (the block's inputs in the quantized model so far), with m_j = mean |X_j|:

    s(a) = m^a / sqrt(max m^a * min m^a),   a in {0, 1/20, ..., 19/20}
    a*   = argmin_a  sum over the site's Linears of || X (Q(W diag s) diag s^-1 - W)^T ||^2     (Q: RTN)

a = 0 is s = 1 (no scaling), so the choice is never worse than plain RTN on the sampled tokens. Where the producer
is a projection whose rows feed several channels (v_proj -> o_proj under grouped-query attention) s is made
constant over each row's channels first. GPTQ then solves the scaled weights on the scaled inputs. Our own code:
AutoAWQ is archived, and the search is the algorithm; llm-compressor's AWQModifier and NNCF's AWQ are the peers.
"""

from __future__ import annotations

import torch

from dscompress.compress.layerwise import run_layer
from dscompress.compress.sites import RowsFold, Site, fold, layer_sites
from dscompress.quant.primitives import fake_quantize

GRID = 20  # scaling exponents tried per site
SAMPLE_TOKENS = 2048  # tokens per site the error is measured on


class _SiteInputs:
    """Mean |x| per channel over every token, and an evenly strided sample of tokens, of one site's input."""

    def __init__(self, site: Site, tokens: int):
        self.site, self.sum, self.n, self.rows = site, None, 0, []
        self.stride = max(1, tokens // SAMPLE_TOKENS)
        self.handle = site.linears[0].module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        total = x.abs().sum(0)
        self.sum = total if self.sum is None else self.sum + total
        self.rows.append(x[(-self.n) % self.stride :: self.stride])
        self.n += x.shape[0]

    def remove(self) -> None:
        self.handle.remove()


def scale_block(model, adapter, index: int, layer, batches: list[tuple], config, bits_of) -> dict:
    """Search and fold AWQ scales into decoder block `index` (on the batches' device). `config`: the gptq stage's
    (group_size, symmetric); `bits_of`: weight name -> its bits. Returns {site name: chosen exponent}."""
    sites = [s for s in layer_sites(adapter, model, index) if s.fold is not None]
    tokens = sum(h[..., 0].numel() for h, _ in batches)
    recorders = [_SiteInputs(site, tokens) for site in sites]
    try:
        run_layer(layer, batches)  # the float block: every site's inputs in one pass
    finally:
        for r in recorders:
            r.remove()
    chosen = {}
    for r in recorders:
        x = torch.cat(r.rows)[:SAMPLE_TOKENS]
        alpha, s = _search(r.site, x, _shared_rows(r.site, r.sum / r.n), config, bits_of)
        if alpha > 0:
            fold(r.site, s)
        chosen[r.site.name] = alpha
    return chosen


def _shared_rows(site: Site, mean_abs: torch.Tensor) -> torch.Tensor:
    """For a producer projection whose rows feed several channels (grouped-query v_proj -> o_proj): each
    channel takes the largest mean |x| of its row's channels, so one factor per row serves all of them."""
    if not isinstance(site.fold, RowsFold):
        return mean_abs
    index = site.fold.index.to(mean_abs.device)
    rows = torch.zeros(site.fold.producer.out_features, device=mean_abs.device)
    return rows.scatter_reduce(0, index, mean_abs, "amax", include_self=False)[index]


@torch.no_grad()
def _search(site: Site, x: torch.Tensor, mean_abs: torch.Tensor, config, bits_of) -> tuple[float, torch.Tensor]:
    """(best exponent, its scales) for one site; exponent 0 (s = 1) when nothing beats the unscaled weights."""
    weights = [t.param.detach().float() for t in site.linears]
    reference = [x @ w.t() for w in weights]
    best, best_alpha, best_s = None, 0.0, torch.ones_like(mean_abs)
    for step in range(GRID):
        alpha = step / GRID
        s = mean_abs.clamp_min(1e-8).pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        error = 0.0
        for t, w, ref in zip(site.linears, weights, reference, strict=True):
            q = fake_quantize(w * s, bits_of(t.name), config.group_size, config.symmetric)[0] / s
            error += float((x @ q.t() - ref).pow(2).sum())
        if best is None or error < best:
            best, best_alpha, best_s = error, alpha, s
    return best_alpha, best_s
