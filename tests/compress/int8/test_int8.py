"""W8A8: the KL threshold search, observers, SmoothQuant, int8 fake quantization, fallback, and the pass end to end."""

import numpy as np
import pytest
import torch
from conftest import cli_here, tiny_recipe
from transformers import AutoModelForCausalLM

from dscompress import run as run_recipe
from dscompress.calibrate.observers import AbsHistogram, kl_divergences, kl_threshold
from dscompress.compress.int8.config import Int8Config
from dscompress.compress.sites import fold, layer_sites, smoothing_scales
from dscompress.errors import EXIT_BAD_INPUT
from dscompress.gates import Gate
from dscompress.gates import within_margin as passes
from dscompress.models.adapters import adapter_for
from dscompress.models.tiny import TINY_ARCHS, tiny_config
from dscompress.quant.actquant import attach_saved, fake_quant_int8, fake_quant_int8_per_token, per_token_scale
from dscompress.quant.qstate import QuantState


def reference_kl(hist: np.ndarray, levels: int = 128, first: int = 128) -> np.ndarray:
    """TensorRT's procedure written out candidate by candidate, as in its GTC 2017 pseudo-code."""
    h = hist.astype(np.float64)
    out = []
    for i in range(first, len(h) + 1):
        p = h[:i].copy()
        p[i - 1] += h[i:].sum()
        level = (np.arange(i) * levels) // i
        nonzero = h[:i] > 0
        mass = np.bincount(level[nonzero], weights=h[:i][nonzero], minlength=levels)
        count = np.bincount(level[nonzero], minlength=levels)
        q = np.where(nonzero, mass[level] / np.maximum(count[level], 1), 0.0)
        p, q = p / p.sum(), q / q.sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(p > 0, p * np.log(p / q), 0.0)
        out.append(terms.sum())
    return np.array(out)


def synthetic(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if kind == "gaussian":
        return torch.randn(200_000, generator=g)
    if kind == "laplacian":
        u = torch.rand(200_000, generator=g) - 0.5
        return -torch.sign(u) * torch.log1p(-2 * u.abs())
    x = torch.randn(200_000, generator=g)  # heavy tail: a few outliers 30-60x the bulk, as LLM activations have
    x[torch.randint(0, len(x), (40,), generator=g)] = 30 + 30 * torch.rand(40, generator=g)
    return x


@pytest.mark.parametrize("kind", ["gaussian", "laplacian", "heavy"])
def test_kl_search_matches_reference(kind):
    obs = AbsHistogram()
    obs.update(synthetic(kind))
    hist = obs.counts.cpu()
    ours, ref = kl_divergences(hist).numpy(), reference_kl(hist.numpy())
    assert np.array_equal(np.isfinite(ours), np.isfinite(ref))
    finite = np.isfinite(ref)
    np.testing.assert_allclose(ours[finite], ref[finite], rtol=1e-9, atol=1e-12)
    threshold, cutoff = kl_threshold(hist)
    assert cutoff == 128 + int(np.argmin(ref)) and threshold == cutoff + 0.5
    if kind == "heavy":  # the search clips the outliers: the threshold sits far below max|x|
        assert threshold * obs.width < 0.2 * obs.amax


def test_histogram_grows_by_exact_merges():
    x = synthetic("laplacian")
    streamed = AbsHistogram()
    for part in x.split(1000):  # the range doubles several times as larger values arrive
        streamed.update(part)
    direct = AbsHistogram()
    direct.range = streamed.range  # the same bins, filled in one go
    direct.update(x)
    assert torch.equal(streamed.counts, direct.counts)
    assert streamed.count == len(x) and streamed.amax == float(x.abs().max())
    assert streamed.percentile(100) >= streamed.amax - streamed.width


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_smoothquant_preserves_float_output(arch):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32).eval()
    adapter = adapter_for(model.config)
    ids = torch.randint(0, model.config.vocab_size, (2, 32))
    with torch.no_grad():
        before = model(ids).logits
        smoothed = 0
        for index in range(len(adapter.layers(model))):
            for site in layer_sites(adapter, model, index):
                x_amax = torch.exp(torch.empty(site.width).uniform_(-3, 4))  # channel maxima across 3 decades
                s = smoothing_scales(site, x_amax, 0.5)
                if s is not None:
                    fold(site, s)
                    smoothed += 1
        after = model(ids).logits
    assert smoothed > 0
    assert float((after - before).abs().max()) < 1e-4


def test_fake_quant_matches_int8_arithmetic():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(16, 64, generator=g) * 3, torch.randn(32, 64, generator=g)
    sx = 2.5 / 127  # clips the tail of x, as a KL threshold does
    sw = w.abs().amax(1) / 127
    xq = torch.round(x / sx).clamp(-128, 127).to(torch.int8)
    wq = torch.round(w / sw[:, None]).clamp(-128, 127).to(torch.int8)
    integer = (xq.to(torch.int32) @ wq.to(torch.int32).T).double() * sx * sw.double()  # int32 accumulate
    x_fake = fake_quant_int8(x, sx)
    assert torch.equal(torch.round(x_fake / sx), xq.float())  # the float tensor carries the int8 codes exactly
    fake = x_fake @ (wq.float() * sw[:, None]).T  # what the evaluated model computes, in float32
    torch.testing.assert_close(fake.double(), integer, rtol=1e-5, atol=1e-5)
    assert float(fake_quant_int8(torch.tensor([1e6]), sx)) == pytest.approx(127 * sx)


def test_per_token_fake_quant_matches_the_integer_product():
    """Dynamic activations: each token's own scale; the float tensor carries codes in [-127, 127] exactly, and the
    fake-quantized product equals int32 accumulation scaled by token x channel scales."""
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(16, 64, generator=g), torch.randn(32, 64, generator=g)
    x[3] *= 100  # an outlier token sets only its own scale
    x[5] = 0  # an all-zero token stays zero
    s = per_token_scale(x)
    xq = fake_quant_int8_per_token(x)
    codes = torch.round(xq / s)
    assert torch.equal(codes, torch.round(x / s)) and codes.abs().max() == 127
    assert torch.equal(xq[5], torch.zeros(64)) and (codes.abs().amax(1) == 127).sum() == 15
    sw = w.abs().amax(1) / 127
    wq = torch.round(w / sw[:, None])
    integer = (codes.double() @ wq.double().T) * s.double() * sw.double()
    torch.testing.assert_close((xq @ (wq * sw[:, None]).T).double(), integer, rtol=1e-5, atol=1e-5)


def test_rotation_refuses_half_precision(tmp_path):
    recipe = tmp_path / "r.yaml"
    stages = "stages: [{int8: {rotate: true, fallback: none}}]\n"
    recipe.write_text("model: {path: 'tiny:llama', dtype: bfloat16}\n" + stages)
    result = cli_here("run", str(recipe), "--out", str(tmp_path / "out"))
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == EXIT_BAD_INPUT and "int8.rotate" in lines[-1] and "float32" in lines[-1], result.stderr


def test_dynamic_int8_is_refused_for_a_tensorrt_target(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {path: 'tiny:llama'}\ntarget: {device: orin-nx-16gb, jetpack: '6.2'}\n"
                      "stages: [{int8: {activations: dynamic, fallback: none}}]\n")  # fmt: skip
    result = cli_here("validate", str(recipe))
    assert result.returncode == EXIT_BAD_INPUT and "dynamic per-token INT8 runs in ONNX Runtime" in result.stderr


def test_passes_uses_the_margin_of_every_gated_metric():
    gate = Gate(kl={"max": 0.1}, perplexity={"max_increase_pct": 2}, top1={"min": 0.9})
    good = {"kl": 0.07, "perplexity_increase_pct": 1.5, "top1": 0.93}
    assert passes(good, gate, 0.8)
    assert not passes(good | {"kl": 0.09}, gate, 0.8)
    assert not passes(good | {"perplexity_increase_pct": 1.7}, gate, 0.8)
    assert not passes(good | {"top1": 0.91}, gate, 0.8)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_int8_stage_on_every_architecture(tmp_path, arch):
    stages = "  - int8: {calibration: kl, fallback: none}\n    gate: {kl: {max: 0.5}}"
    report = run_recipe(tiny_recipe(tmp_path / "r.yaml", f"tiny:{arch}", stages), tmp_path / "out")
    stage = tmp_path / "out" / "1-int8"
    assert report["result"] == "passed"
    quant = QuantState.load(stage)
    int8 = [n for n, a in quant.activations.items() if a["precision"] == "int8"]
    assert int8 and all(f"{n}.input_scale" in quant.tensors for n in int8)
    model = AutoModelForCausalLM.from_pretrained(stage)
    for name, meta in quant.targets.items():  # weights on the int8 grid, per output channel
        module_path, attr = (name, "weight") if meta["kind"] == "linear" else name.rsplit(".", 1)
        weight = getattr(model.get_submodule(module_path), attr).detach()
        codes = quant.codes(name, weight).float() - 128
        assert torch.equal(codes * quant.tensors[f"{name}.scale"], weight), name
    summary = report["stages"][1]["summary"]
    assert 0 < summary["w8a8_linear_flops_share"] < 1  # lm_head and routed experts stay W8A16 / float
    assert attach_saved(model, stage) == sorted(int8)


def test_fallback_keeps_the_most_sensitive_sites(tmp_path):
    stages = "  - int8: {calibration: minmax, smoothquant_alpha: null, fallback: auto}\n    gate: {kl: {max: 0.00001}}"
    report = run_recipe(tiny_recipe(tmp_path / "r.yaml", "tiny:qwen2", stages), tmp_path / "out")
    summary = report["stages"][1]["summary"]
    acts = QuantState.load(tmp_path / "out" / "1-int8").activations
    sens = {a["site"]: a["sensitivity_kl"] for a in acts.values()}
    kept = set(summary["fallback_sites"])
    assert kept and len(kept) < len(sens)
    assert min(sens[s] for s in kept) >= max(sens[s] for s in sens if s not in kept)
    assert all((a["precision"] == "float") == (a["site"] in kept) for a in acts.values())
    assert summary["estimate_on_calibration"]["kl"] <= 0.8 * 0.00001


def test_fallback_ranks_nothing_when_every_site_already_passes(tmp_path):
    """The ranking (one run per site) only chooses what to keep float: with every site passing the estimate it is
    skipped, and every activation is int8 with no sensitivity recorded."""
    stages = "  - int8: {calibration: minmax, fallback: auto}\n    gate: {kl: {max: 5}}"
    report = run_recipe(tiny_recipe(tmp_path / "r.yaml", "tiny:qwen2", stages), tmp_path / "out")
    summary = report["stages"][1]["summary"]
    assert summary["ranking"] == "skipped: every site passes" and summary["fallback_sites"] == []
    assert summary["estimate_on_calibration"]["kl"] <= 0.8 * 5 and not summary["sensitivity_kl"]
    acts = QuantState.load(tmp_path / "out" / "1-int8").activations
    assert acts and all(a["precision"] == "int8" and a["sensitivity_kl"] is None for a in acts.values())
    assert summary["w8a8_decoder_flops_share"] == 1.0


@pytest.mark.parametrize(
    ("stage", "expect"),
    [
        ("{int8: {smoothquant_alpha: 1.5}, gate: {kl: {max: 1}}}", "smoothquant_alpha: 1.5"),
        ("{int8: {calibration: entropy}, gate: {kl: {max: 1}}}", "allowed: 'kl', 'minmax' or 'percentile'"),
        ("{int8: {fallback: auto}}", "has no gate; add a gate, or set int8.fallback: none"),
        ("{int8: {exclude: ['(']}, gate: {kl: {max: 1}}}", "exclude"),
    ],
)
def test_bad_int8_options_are_one_line_errors(tmp_path, stage, expect):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{path: 'tiny:llama'}}\nstages: [{stage}]\n")
    result = cli_here("run", str(recipe), "--out", str(tmp_path / "out"))
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == EXIT_BAD_INPUT and len(lines) == 1 and expect in lines[0], result.stderr


def test_int8_config_defaults_are_the_documented_ones():
    config = Int8Config()
    assert (config.calibration, config.smoothquant_alpha, config.fallback) == ("kl", 0.5, "auto")


@pytest.mark.parametrize("alpha", [0.5, None])
def test_layers_too_big_to_keep_give_the_kept_histograms(monkeypatch, alpha):
    """Above KEEP_BYTES a layer runs twice instead of keeping its site inputs; the second run's histograms get
    their range from the first run's channel maxima, so the thresholds are the kept path's (float round-off in the
    folded smoothing moves at most a few values by one bin)."""
    from dscompress.compress.int8 import apply as int8_apply  # noqa: PLC0415
    from dscompress.context import StageContext  # noqa: PLC0415

    config = Int8Config(calibration="kl", smoothquant_alpha=alpha)
    calib = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(0))
    results = []
    for keep_bytes in (1 << 30, 0):
        monkeypatch.setattr(int8_apply, "KEEP_BYTES", keep_bytes)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config("qwen2"), dtype=torch.float32).eval()
        with StageContext.standalone(model, calib, quiet=True) as ctx:
            sites = {i: layer_sites(ctx.adapter, model, i) for i in range(len(ctx.adapter.layers(model)))}
            observers, _ = int8_apply.calibrate(model, ctx, config, sites.__getitem__)
        results.append(observers)
    kept, again = results
    assert kept.keys() == again.keys() and kept
    for name in kept:
        assert kept[name].range == pytest.approx(again[name].range, rel=1e-6)
        assert kept[name].count == again[name].count
        assert float((kept[name].counts - again[name].counts).abs().sum()) <= 0.001 * kept[name].count
        assert kept[name].threshold("kl", 99.99) == pytest.approx(again[name].threshold("kl", 99.99), rel=2e-3)
