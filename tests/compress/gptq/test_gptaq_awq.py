"""gptq's GPTAQ (asymmetric calibration) and AWQ scaling: the least-squares target, the float model kept by the
scaling, the effect on calibration error, every architecture, resume, refusals."""

import pytest
import torch
from conftest import tiny_recipe

import dscompress
from dscompress.compress.gptq.apply import apply
from dscompress.compress.gptq.awq import scale_block
from dscompress.compress.gptq.config import GPTQConfig
from dscompress.compress.gptq.gptaq import CrossAccumulator, shift_target
from dscompress.compress.gptq.math import HessianAccumulator
from dscompress.compress.gptq.memory import accelerator_peak
from dscompress.compress.layerwise import capture_layer_inputs, run_layer
from dscompress.context import StageContext
from dscompress.errors import RecipeError
from dscompress.models.adapters import adapter_for
from dscompress.models.load import load_model
from dscompress.models.sources import resolve
from dscompress.models.tiny import TINY_ARCHS
from dscompress.quant.qstate import QuantState
from dscompress.recipe import load_recipe

CALIB = torch.randint(0, 256, (6, 48), generator=torch.Generator().manual_seed(0))


def run_pass(arch: str, config: GPTQConfig, resume_dir=None):
    model = load_model(resolve(f"tiny:{arch}").directory)
    with StageContext.standalone(model, CALIB, quiet=True, resume_dir=resume_dir) as ctx:
        return apply(model, config, ctx)


def calibration_kl(model) -> float:
    reference = load_model(resolve("tiny:qwen2").directory)
    with torch.no_grad():
        p, q = reference(CALIB).logits.log_softmax(-1), model(CALIB).logits.log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_the_shifted_target_is_the_least_squares_fit_of_the_float_outputs():
    g = torch.Generator().manual_seed(0)
    x_quant = torch.randn(4000, 24, generator=g)
    x_float = x_quant + 0.1 * torch.randn(4000, 24, generator=g)
    W = torch.randn(16, 24, generator=g)
    acc, cross = HessianAccumulator(24, torch.device("cpu")), CrossAccumulator(24, torch.device("cpu"))
    for a, b in zip(x_float.split(1000), x_quant.split(1000), strict=True):  # running means, batch by batch
        acc.add(b)
        cross.add(a, b)
    full, half = (shift_target(W, acc.H, cross.copy(), damp_frac=d, alpha=a) for d, a in ((1e-9, 1.0), (0.01, 0.5)))
    target = shift_target(W, acc.H, cross.copy(), damp_frac=0.01, alpha=1.0)
    fit = torch.linalg.lstsq(x_quant.double(), (x_float @ W.t()).double()).solution.t()
    assert torch.allclose(full.double(), fit, atol=1e-3)
    assert torch.allclose(half - W, 0.5 * (target - W), atol=1e-5)
    same = CrossAccumulator(24, torch.device("cpu"))
    same.add(x_quant, x_quant)
    assert torch.equal(shift_target(W, acc.H, same, 0.01, 1.0), W)  # no input error, no shift
    assert same.D is None  # consumed


def test_gptaq_fits_the_calibration_windows_closer_to_the_float_model():
    config = dict(bits=3, group_size=32, symmetric=False, exclude=["embed_tokens"])
    plain = run_pass("qwen2", GPTQConfig(**config))
    asym = run_pass("qwen2", GPTQConfig(**config, gptaq=0.25))
    assert calibration_kl(asym.model) < 0.75 * calibration_kl(plain.model)  # measured 0.00046 vs 0.00089
    for name in asym.quant.targets:  # still on its grid
        w = asym.model.get_submodule(name).weight.detach()
        codes = asym.quant.codes(name, w)
        scale = asym.quant.tensors[f"{name}.scale"].repeat_interleave(32, 1)
        zero = asym.quant.tensors[f"{name}.zero"].repeat_interleave(32, 1)
        assert torch.allclose((codes - zero) * scale, w, atol=1e-6)


def test_awq_scales_keep_the_float_block_and_are_reported():
    model = load_model(resolve("tiny:llama").directory)
    adapter = adapter_for(model.config)
    batches = capture_layer_inputs(model, adapter, CALIB, 3, torch.device("cpu"))
    layer = adapter.layers(model)[0]
    with torch.no_grad():
        before = run_layer(layer, batches)
        chosen = scale_block(model, adapter, 0, layer, batches, GPTQConfig(bits=3, group_size=32), lambda n: 3)
        after = run_layer(layer, batches)
    assert set(chosen) == {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj",
                           "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.down_proj"}  # fmt: skip
    assert any(a > 0 for a in chosen.values())
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(before, after, strict=True))
    assert float(layer.input_layernorm.weight.detach().std()) > 0  # the norm took the division


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_awq_and_gptaq_run_on_every_architecture(arch):
    out = run_pass(arch, GPTQConfig(group_size=32, awq=True, gptaq=0.25))
    assert out.summary["awq_exponents"] and out.summary["quantized_weights"] > 0
    moe = any(meta["kind"] != "linear" for meta in out.quant.targets.values())
    assert (out.summary.get("gptaq_plain_expert_groups", 0) > 0) == moe  # experts: plain GPTQ, counted


def test_a_killed_awq_gptaq_pass_resumes_with_the_same_result(tmp_path):
    config = GPTQConfig(group_size=32, awq=True, gptaq=0.25, symmetric=False)
    full = run_pass("qwen3", config, resume_dir=tmp_path / "full")
    blocks = sorted((tmp_path / "full").glob("block-*.safetensors"))
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / blocks[0].name).write_bytes(blocks[0].read_bytes())  # killed while solving block 1
    resumed = run_pass("qwen3", config, resume_dir=partial)
    assert resumed.summary["blocks_resumed"] == 1
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_awq_gptaq_stage_runs_from_a_recipe_and_loads_back(tmp_path):
    stage = ("  - gptq: {bits: 4, group_size: 32, symmetric: false, awq: true, gptaq: 0.25}\n"
             "    gate: {kl: {max: 1.0}}\n    onnx: {targets: [onnx-ort]}")  # fmt: skip
    report = dscompress.run(tiny_recipe(tmp_path / "r.yaml", "tiny:qwen2", stage), tmp_path / "o")
    assert report["result"] == "passed"
    assert all(v["passed"] for v in report["stages"][1]["verdicts"])  # the ONNX Runtime gates included
    assert QuantState.load(next(p for p in (tmp_path / "o").iterdir() if p.name.startswith("1-"))).targets


@pytest.mark.parametrize(
    ("option", "expect"),
    [
        ("gptaq: 0.5, devices: 2", "gptaq runs a float copy.*set devices: 1 or gptaq: 0"),
        ("gptaq: 0.5, true_sequential: false", "set true_sequential: true or gptaq: 0"),
        ("gptaq: 1.5", "less than or equal to 1"),
        ("awq: true, devices: 2", "set devices: 1 or awq: false"),
    ],
)
def test_bad_gptaq_and_awq_options(tmp_path, option, expect):
    with pytest.raises(RecipeError, match=expect):
        load_recipe(tiny_recipe(tmp_path / "r.yaml", stages=f"  - gptq: {{{option}}}"))


def test_the_memory_prediction_counts_the_float_twin_and_the_scale_search():
    model = load_model(resolve("tiny:qwen2").directory)
    targets = [t for t in adapter_for(model.config).weight_targets(model) if t.layer >= 0]
    peak = {(a, g): accelerator_peak(targets, model.config.hidden_size, 64, 512, 8, 1, 2, awq=a, gptaq=g)["peak_bytes"]
            for a in (False, True) for g in (False, True)}  # fmt: skip
    assert peak[(False, False)] < peak[(False, True)] <= peak[(True, True)]
    assert peak[(False, False)] < peak[(True, False)] <= peak[(True, True)]
