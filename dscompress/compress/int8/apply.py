"""`int8` pass: static W8A8 with KL (entropy) calibration, SmoothQuant, and accuracy-aware fallback.

1. Calibrate, one decoder layer at a time on the accelerator: every activation site (one tensor read by one or more
   Linear layers, see compress/sites.py) gets its per-channel max|x| and then, after SmoothQuant is folded in, a
   2048-bin |x| histogram over the exact range. When a layer's site inputs fit in KEEP_BYTES they are kept for
   that layer only; otherwise the layer runs twice, the second time into histograms whose range the first run's
   channel maxima give (the same histograms, one more layer pass instead of the memory). Only statistics outlive
   the layer.
2. Weights: int8, per output channel, symmetric. Activations: int8, symmetric; `static`: per tensor, the scale is
   the site's threshold (kl | minmax | percentile) / 127; `dynamic`: per token, the scale computed at run time
   (quant/actquant.py), so calibration only feeds SmoothQuant, and lm_head, when selected, reads int8 too (it is
   the largest Linear of a small model's decode step).
3. Fallback (`auto`): if the model with every site quantized already passes the estimate, nothing is ranked.
   Otherwise each site's sensitivity is the KL to the float model when only its activations are
   quantized, measured on `sensitivity_windows` calibration windows (each run starts from the cached input of
   the site's layer). Then the fewest most-sensitive sites are kept in W8A16 for the stage gate to hold, with
   `fallback_margin` of the gate's slack, on `fallback_windows` calibration windows, found by bisection. The
   count is decided on more windows than the ranking: two windows (1k tokens) put SmolLM2 at +1.5% where the
   held-out gate measured +2.0%; eight put it at +1.50% where the gate measured +1.27%.
The artifact keeps weights on their int8 grid; quantization.{json,safetensors} holds weight scales, activation
scales and per-Linear activation precision. Evaluation runs with activation fake quantization (quant/actquant.py).
"""

from __future__ import annotations

import math
import resource
import time

import torch

from dscompress.calibrate.metrics import kl_full
from dscompress.calibrate.observers import AbsHistogram
from dscompress.compress.int8.config import Int8Config
from dscompress.compress.layerwise import capture_layer_inputs, run_layer
from dscompress.compress.rotation import OnlineRotation, check_rotate, rotate_model
from dscompress.compress.selection import selected
from dscompress.compress.sites import Site, fold, layer_sites, smoothing_scales
from dscompress.context import PassOutput, StageContext
from dscompress.errors import RecipeError
from dscompress.gates import within_margin
from dscompress.quant.actquant import controller
from dscompress.quant.primitives import fake_quantize
from dscompress.quant.qstate import QuantState

KEEP_BYTES = 1 << 28  # a layer's site inputs kept for one pass; above it the layer runs twice (same histograms)


def check(config: Int8Config, info) -> list[tuple[str, str]]:
    if not config.rotate and not config.online_hadamard:
        return [("online_hadamard", "false applies to a rotated model only; set rotate: true or drop the field")]
    return check_rotate(config, info)


# ---- 1. calibration -------------------------------------------------------------------------------------------
class _Recorder:
    """Pre-hooks on each site's first reader: per-channel max|x|, and the inputs (keep) or histograms (observe)."""

    def __init__(self, sites: list[Site], keep: bool, observers: dict[str, AbsHistogram] | None = None):
        self.chan_amax: dict[str, torch.Tensor] = {}
        self.kept: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites}
        self.keep, self.observers = keep, observers
        self.handles = [s.linears[0].module.register_forward_pre_hook(self._hook(s)) for s in sites]

    def _hook(self, site: Site):
        def hook(module, args):
            x = args[0].detach().reshape(-1, site.width)
            amax = x.abs().amax(0).float()
            prev = self.chan_amax.get(site.name)
            self.chan_amax[site.name] = amax if prev is None else torch.maximum(prev, amax)
            if self.keep:
                self.kept[site.name].append(x)
            if self.observers is not None:
                self.observers[site.name].update(x)

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []  # the hooks close over self: break the cycle so kept inputs free with the recorder


@torch.no_grad()
def calibrate(model, ctx: StageContext, config: Int8Config, sites_of) -> tuple[dict[str, AbsHistogram], int]:
    """Observe (and smooth) every site, layer by layer. Returns ({site: histogram}, number of smoothed sites).
    Dynamic activations need no histograms: only the channel maxima that SmoothQuant reads."""
    adapter, device = ctx.adapter, ctx.device
    windows = ctx.calibration()
    batches = capture_layer_inputs(model, adapter, windows, config.batch_size, device)
    layers, observers, smoothed = adapter.layers(model), {}, 0
    observe, smooth = config.activations == "static", config.smoothquant_alpha is not None
    label = f"int8 calibration ({config.calibration})" if observe else "int8 SmoothQuant statistics"
    for index in ctx.track(range(len(layers)), label):
        layer = layers[index].to(device)
        sites = sites_of(index)
        keep = observe and windows.numel() * sum(s.width for s in sites) * 4 <= KEEP_BYTES
        rec = _Recorder(sites, keep)
        outs = run_layer(layer, batches)
        rec.remove()
        scales = {}
        for site in sites:
            s = smoothing_scales(site, rec.chan_amax[site.name], config.smoothquant_alpha) if smooth else None
            if s is not None:
                fold(site, s)
                smoothed += 1
            scales[site.name] = s
            if keep:
                observers[site.name] = _observe_kept(rec.kept.pop(site.name), s)
        if observe and not keep:  # too big to keep: the (smoothed) layer runs once more into exact-range histograms
            observers |= _observe_again(layer, batches, sites, rec.chan_amax, scales)
        del rec
        batches = [(out, kwargs) for out, (_, kwargs) in zip(outs, batches, strict=True)]
        layers[index] = layer.to("cpu")
    return observers, smoothed


def _observe_again(layer, batches, sites: list[Site], chan_amax: dict, scales: dict) -> dict[str, AbsHistogram]:
    """Each site's histogram from a second run of the layer, its range set first from the first run's channel
    maxima (max|x / s| = max over channels of amax / s): the same histogram keeping the inputs gives, without
    holding them (a Qwen2.5-0.5B layer's 32 x 512 calibration inputs are 0.5 GB)."""
    observers = {}
    for site in sites:
        s, amax = scales[site.name], chan_amax[site.name]
        observers[site.name] = AbsHistogram()
        observers[site.name].expect(float((amax if s is None else amax * (1.0 / s).to(amax)).max()))
    rec = _Recorder(sites, False, observers)
    run_layer(layer, batches)
    rec.remove()
    return observers


def _observe_kept(kept: list[torch.Tensor], s: torch.Tensor | None) -> AbsHistogram:
    """The histogram of a site's smoothed inputs x / s, with the range set from their exact max."""
    inv = None if s is None else (1.0 / s).to(kept[0].device, kept[0].dtype)
    obs = AbsHistogram()
    obs.expect(max(float((x.abs() if inv is None else (x * inv).abs()).max()) for x in kept))
    while kept:  # consume the list so each batch is freed once counted
        x = kept.pop()
        obs.update(x if inv is None else x * inv)
    obs.counts = obs.counts.cpu()
    return obs


# ---- 2. weights and scales ------------------------------------------------------------------------------------
def quantize_weights(model, adapter, config: Int8Config, state: QuantState) -> int:
    """Every selected weight (Linear and stacked experts) to int8 per output channel, symmetric, in place."""
    targets = selected(list(adapter.weight_targets(model)), config.exclude)
    with torch.no_grad():
        for t in targets:
            deq, scale, zero = fake_quantize(t.param, 8, -1, True)
            t.param.copy_(deq.to(t.param.dtype))
            state.add(t.name, t.kind, t.param.shape, scale, zero)
    return len(targets)


def site_readers(site: Site, config: Int8Config) -> list[str]:
    """The Linear names at a site whose activations are quantized (excluded Linears stay float)."""
    return [t.name for t in selected(site.linears, config.exclude)]


# ---- 3. sensitivity and fallback ------------------------------------------------------------------------------
class _Probe:
    """Forward passes on a few calibration windows, `batch` at a time: the float reference (kept as log-probs,
    windows x seq x vocab x 4 bytes), and the model from any decoder layer on."""

    def __init__(self, model, adapter, windows: torch.Tensor, device, batch: int):
        self.model, self.adapter = model, adapter
        self.chunks = [w.to(device) for w in windows.split(batch)]
        self.ref = [self._logprobs(c) for c in self.chunks]
        self.ref_nll = sum(_nll_sum(r, c) for r, c in zip(self.ref, self.chunks, strict=True))
        self.ref_top1 = [r.argmax(-1) for r in self.ref]
        self.inputs: list[list[torch.Tensor]] = []  # [chunk][layer]
        self.kwargs: list[dict] = []  # [chunk]

    def _logprobs(self, chunk: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.model(chunk, use_cache=False).logits[:, :-1].float(), -1)

    def cache_layer_inputs(self) -> None:
        """Record what each decoder layer receives in the current (weight-quantized) model."""
        layers = self.adapter.layers(self.model)
        self.inputs, self.kwargs = [], []
        for chunk in self.chunks:
            seen, extra = [None] * len(layers), {}

            def hook(module, args, kwargs, index, seen=seen, extra=extra):
                seen[index] = args[0] if args else kwargs["hidden_states"]
                extra.update({k: v for k, v in kwargs.items() if k != "hidden_states"})

            handles = [
                layer.register_forward_pre_hook(lambda m, a, k, i=i: hook(m, a, k, i), with_kwargs=True)
                for i, layer in enumerate(layers)
            ]
            seen.append(None)  # the final norm's input: where a run that starts after the last layer begins
            norm = self.model.get_submodule(self.adapter.final_norm_path)
            handles.append(norm.register_forward_pre_hook(lambda m, a, seen=seen: seen.__setitem__(-1, a[0])))
            try:
                self.model(chunk, use_cache=False)
            finally:
                for h in handles:
                    h.remove()
            self.inputs.append(seen)
            self.kwargs.append(extra)

    def _tail(self, index: int, start: int) -> torch.Tensor:
        """Log-probs of chunk `index` when the model runs from decoder layer `start` on its cached input (start =
        the number of layers: from the final norm on)."""
        hidden = self.inputs[index][start]
        for layer in self.adapter.layers(self.model)[start:]:
            out = layer(hidden, **self.kwargs[index])
            hidden = out[0] if isinstance(out, tuple) else out
        hidden = self.model.get_submodule(self.adapter.final_norm_path)(hidden)
        logits = self.model.get_submodule(self.adapter.lm_head_path)(hidden)[:, :-1].float()
        return torch.log_softmax(logits, -1)

    def metrics(self, start: int | None = None) -> dict:
        """KL, perplexity increase and top-1 against the float reference, whole model or from layer `start` on."""
        kl = nll = top1 = 0.0
        count = 0
        for i, (chunk, ref) in enumerate(zip(self.chunks, self.ref, strict=True)):
            logp = self._logprobs(chunk) if start is None else self._tail(i, start)
            kl += float(kl_full(ref, logp).sum())
            nll += _nll_sum(logp, chunk)
            top1 += float((logp.argmax(-1) == self.ref_top1[i]).double().sum())
            count += chunk[:, 1:].numel()
        increase = (math.exp((nll - self.ref_nll) / count) - 1.0) * 100.0
        return {"kl": kl / count, "perplexity_increase_pct": increase, "top1": top1 / count}


def _nll_sum(logp: torch.Tensor, chunk: torch.Tensor) -> float:
    return float(-logp.gather(-1, chunk[:, 1:].unsqueeze(-1)).double().sum())


def sensitivities(probe: _Probe, aq, sites: list[Site], config: Int8Config, track) -> dict[str, float]:
    """KL to the float model with only one site's activations quantized (weights already int8)."""
    aq.disable()
    probe.cache_layer_inputs()
    result = {}
    for site in track(sites, "int8 sensitivity"):
        names = site_readers(site, config)
        aq.enable(names)
        result[site.name] = probe.metrics(site.layer)["kl"]
        aq.disable(names)
    return result


def _estimate(probe: _Probe, aq, quantized: list[Site], config: Int8Config) -> dict:
    """The whole model's metrics on the probe's windows with exactly these sites' activations quantized."""
    aq.disable()
    for site in quantized:
        aq.enable(site_readers(site, config))
    return probe.metrics()


def choose_fallback(probe: _Probe, aq, order: list[Site], config: Int8Config, gate, everything=None):
    """(count, estimate): the fewest leading sites of `order` (most sensitive first) kept float so that the estimate
    passes. `everything`: the estimate with every site quantized, where already measured."""

    def estimate(k: int) -> dict:
        return _estimate(probe, aq, order[k:], config)

    tried = {0: everything or estimate(0)}
    if within_margin(tried[0], gate, config.fallback_margin):
        return 0, tried[0]
    tried[len(order)] = estimate(len(order))
    if not within_margin(tried[len(order)], gate, config.fallback_margin):
        return len(order), tried[len(order)]  # even W8A16 everywhere misses: the stage gate will say so
    lo, hi = 0, len(order)  # fails at lo, passes at hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        tried[mid] = estimate(mid)
        lo, hi = (lo, mid) if within_margin(tried[mid], gate, config.fallback_margin) else (mid, hi)
    return hi, tried[hi]


# ---- the pass -------------------------------------------------------------------------------------------------
def head_site(model, adapter, config: Int8Config) -> list[Site]:
    """lm_head as a site of its own (after the last layer, never smoothed) for dynamic activations, if selected."""
    head = [t for t in selected(list(adapter.weight_targets(model)), config.exclude) if t.name == adapter.lm_head_path]
    if config.activations != "dynamic" or not head:
        return []
    return [Site(adapter.lm_head_path, len(adapter.layers(model)), head, None)]


def apply(model: torch.nn.Module, config: Int8Config, ctx: StageContext) -> PassOutput:
    adapter, device = ctx.adapter, ctx.device
    if config.fallback == "auto" and ctx.gate is None:
        raise ValueError("int8 fallback: auto needs a gate on the stage")  # recipe validation catches it first
    state = QuantState("int8", 8, -1, True)
    stats: dict = {"activations": config.activations, "smoothquant_alpha": config.smoothquant_alpha}
    online = _rotate(model, adapter, config, ctx, stats)
    all_sites = {i: layer_sites(adapter, model, i) for i in range(len(adapter.layers(model)))}
    for site in (s for sites in all_sites.values() for s in sites):
        if online is not None and site.name in online.factors:
            site.fold = None  # channels mixed by the rotation: no per-channel smoothing into up_proj
    sites_of = lambda i: [s for s in all_sites[i] if site_readers(s, config)]  # noqa: E731
    if config.activations == "static":
        stats["calibration"] = config.calibration
    with torch.no_grad():
        ranking = decide = None
        if config.fallback == "auto":
            calib, model = ctx.calibration(), model.to(device)
            ranking = _Probe(model, adapter, calib[: config.sensitivity_windows], device, config.batch_size)
            decide = _Probe(model, adapter, calib[: config.fallback_windows], device, config.batch_size)
            model.to("cpu")
        t0 = time.perf_counter()
        observers, stats["smoothed_sites"] = {}, 0
        if config.activations == "static" or config.smoothquant_alpha is not None:
            observers, stats["smoothed_sites"] = calibrate(model, ctx, config, sites_of)
        sites = [s for i in sorted(all_sites) for s in sites_of(i)] + head_site(model, adapter, config)
        thresholds = {}
        if config.activations == "static":
            thresholds = {s.name: observers[s.name].threshold(config.calibration, config.percentile) for s in sites}
        stats["calibration_s"] = time.perf_counter() - t0
        stats["quantized_weights"] = quantize_weights(model, adapter, config, state)
        aq = _activation_quant(model.to(device), sites, thresholds, config)
        sens, fallback = {}, []
        if ranking is not None:
            t1 = time.perf_counter()
            everything = _estimate(decide, aq, sites, config)
            if within_margin(everything, ctx.gate, config.fallback_margin):  # no site needs ranking
                stats["estimate_on_calibration"], stats["ranking"] = everything, "skipped: every site passes"
            else:
                sens = sensitivities(ranking, aq, sites, config, ctx.track)
                order = sorted(sites, key=lambda s: (-sens[s.name], s.name))
                count, stats["estimate_on_calibration"] = choose_fallback(
                    decide, aq, order, config, ctx.gate, everything
                )
                fallback = [s.name for s in order[:count]]
            del ranking
            stats["sensitivity_s"] = time.perf_counter() - t1
        aq.disable()
        if online is not None:  # weights back in the original basis; the quantizer rotates around itself
            for name, factors in online.finish().items():
                if name in state.targets:  # an excluded down_proj is simply float again
                    aq.set_rotation(name, factors)
                    state.targets[name]["rotation"] = list(factors)
        for site in sites:
            if site.name not in fallback:
                aq.enable(site_readers(site, config))
    _record(state, sites, set(fallback), thresholds, sens, config)
    stats.update(
        sites=len(sites), fallback_sites=fallback, w8a8_linear_flops_share=w8a8_share(model, adapter, aq.enabled),
        w8a8_decoder_flops_share=w8a8_share(model, adapter, aq.enabled, decoder_only=True),
        sensitivity_kl={s.name: sens[s.name] for s in sites if s.name in sens},  # report.html charts it
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        calibration_tokens=int(ctx.calibration().numel()),
    )  # fmt: skip
    return PassOutput(model, quant=state, summary=stats)


def _rotate(model, adapter, config: Int8Config, ctx: StageContext, stats: dict) -> OnlineRotation | None:
    """The offline rotation, and (online_hadamard) down_proj's inputs in the rotated basis until the pass ends
    (rotation.py)."""
    if not config.rotate:
        return None
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        raise RecipeError(
            f"int8.rotate: the model runs in {dtype}; rotating weights there loses the int8 grid to rounding "
            "(down_proj is stored rotated back). Fix: model.dtype: float32 for this stage, or rotate: false"
        )
    stats["rotation"] = rotate_model(model, adapter, ctx.seed) | {"online_hadamard": config.online_hadamard}
    return OnlineRotation(model, adapter) if config.online_hadamard else None


def _activation_quant(model, sites: list[Site], thresholds: dict, config: Int8Config):
    """The model's activation quantizer with every site's readers set up (static scale or per token), all off."""
    aq = controller(model)
    for site in sites:
        for name in site_readers(site, config):
            if config.activations == "dynamic":
                aq.set_dynamic(name)
            else:
                aq.set_scale(name, thresholds[site.name] / 127.0)
    return aq


def _record(state: QuantState, sites, fallback: set, thresholds: dict, sens: dict, config: Int8Config) -> None:
    for site in sites:
        precision = "float" if site.name in fallback else "int8"
        for name in site_readers(site, config):
            info = {"precision": precision, "mode": config.activations, "site": site.name,
                    "sensitivity_kl": sens.get(site.name)}  # fmt: skip
            if config.activations == "static":
                info |= {"threshold": thresholds[site.name], "observer": config.calibration}
                if precision == "int8":
                    state.tensors[f"{name}.input_scale"] = torch.tensor(thresholds[site.name] / 127.0)
            state.activations[name] = info


def w8a8_share(model, adapter, int8_linears: list[str], decoder_only: bool = False) -> float:
    """Share of per-token Linear multiply-adds (decoder, routed experts at top-k, and lm_head unless
    `decoder_only`) that run W8A8."""
    config = model.config.get_text_config()
    active = set(int8_linears)
    total = int8 = 0
    for t in adapter.weight_targets(model):
        if decoder_only and t.name == adapter.lm_head_path:
            continue
        flops = t.param.shape[-1] * t.param.shape[-2]
        if t.kind == "experts":
            flops *= getattr(config, "num_experts_per_tok", 1)
        total += flops
        int8 += flops if t.name in active else 0
    return int8 / total if total else 0.0
