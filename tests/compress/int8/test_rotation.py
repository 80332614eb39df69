"""Rotation before int8 (QuaRot-style): exact in float, the int8 grid kept through the online Hadamard, refusals."""

import pytest
import torch
from conftest import cli, tiny_recipe

from dscompress import run as run_recipe
from dscompress.compress.rotation import OnlineRotation, rotate_model
from dscompress.errors import EXIT_BAD_INPUT
from dscompress.models.adapters import adapter_for
from dscompress.models.load import load_model
from dscompress.models.sources import resolve
from dscompress.quant.actquant import attach_saved
from dscompress.quant.hadamard import block_factors, random_orthogonal_like_hadamard, rotate, sylvester
from dscompress.quant.qstate import QuantState


@pytest.mark.parametrize("width", [8, 64, 96, 576, 896, 1536, 4864])
def test_rotations_are_orthogonal(width):
    r = random_orthogonal_like_hadamard(width, seed=3)
    torch.testing.assert_close(r @ r.T, torch.eye(width, dtype=torch.float64), atol=1e-10, rtol=0)
    block, a, b = block_factors(width)
    assert a * b == block and width % block == 0 and a <= b
    x = torch.randn(3, width, dtype=torch.float64)
    dense = torch.block_diag(*[torch.kron(sylvester(a), sylvester(b))] * (width // block))
    torch.testing.assert_close(rotate(x.float(), a, b).double(), x @ dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rotate(rotate(x.float(), a, b), a, b).double(), x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_rotated_model_computes_the_same_logits(arch):
    stage = resolve(f"tiny:{arch}").directory
    model, ref_model = load_model(stage).eval(), load_model(stage).eval()
    adapter = adapter_for(model.config)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = ref_model(ids).logits
        info = rotate_model(model, adapter, seed=0)
        online = OnlineRotation(model, adapter)
        rotated = model(ids).logits
        online.finish()
        back = model(ids).logits
    assert info["untied_embeddings"] == ref_model.config.tie_word_embeddings
    norm = model.get_submodule(adapter.final_norm_path).weight
    assert torch.equal(norm, torch.ones_like(norm))
    torch.testing.assert_close(rotated, ref, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(back, ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_rotated_int8_stage_keeps_its_grid_and_exports(tmp_path, mode):
    target = "onnx" if mode == "static" else "onnx-ort"
    stages = (
        f"  - int8: {{rotate: true, activations: {mode}, calibration: minmax, fallback: none}}\n"
        f"    gate: {{kl: {{max: 0.5}}}}\n    onnx: {{targets: [{target}], parity: {{max_kl_diff: 0.0005}}}}"
    )
    report = run_recipe(tiny_recipe(tmp_path / "r.yaml", "tiny:qwen2", stages), tmp_path / "out")
    assert report["result"] == "passed", report
    stage = tmp_path / "out" / "1-int8"
    quant = QuantState.load(stage)
    rotated = [n for n, meta in quant.targets.items() if meta.get("rotation")]
    assert rotated and all(n.endswith("mlp.down_proj") for n in rotated)
    model = load_model(stage)  # stock transformers: the stored weights are the W8A16 model, no hook needed
    assert not model.config.tie_word_embeddings
    for name in quant.targets:  # every weight, rotated ones included, gives back its int8 codes exactly
        weight = model.get_submodule(name).weight.detach()
        codes = quant.codes(name, weight).float() - 128
        dequant = codes * quant.tensors[f"{name}.scale"]
        expect = rotate(weight, *quant.targets[name]["rotation"]) if name in rotated else weight
        torch.testing.assert_close(dequant, expect, atol=1e-5, rtol=0)
    counts = report["stages"][1]["onnx"][target]["quantization"]
    assert counts["online_rotations"] == 2  # one per layer's down_proj input
    assert all(v["passed"] for v in report["stages"][1]["verdicts"])
    assert sorted(attach_saved(model, stage)) == sorted(
        n for n, a in quant.activations.items() if a["precision"] == "int8"
    )


def test_rotation_without_the_online_hadamard_exports_no_run_time_rotation(tmp_path):
    """online_hadamard: false keeps the free offline rotation only: the float model is unchanged, down_proj is
    stored and quantized as it is (no `rotation` on any target) and the CPU graph carries no extra MatMuls."""
    stages = (
        "  - int8: {rotate: true, online_hadamard: false, activations: dynamic, fallback: none}\n"
        "    gate: {kl: {max: 0.5}}\n    onnx: {targets: [onnx-ort], parity: {max_kl_diff: 0.0005}}"
    )
    report = run_recipe(tiny_recipe(tmp_path / "r.yaml", "tiny:llama", stages), tmp_path / "out")
    assert report["result"] == "passed", report
    stage = tmp_path / "out" / "1-int8"
    quant = QuantState.load(stage)
    assert not any(meta.get("rotation") for meta in quant.targets.values())
    assert report["stages"][1]["summary"]["rotation"]["online_hadamard"] is False
    assert report["stages"][1]["onnx"]["onnx-ort"]["quantization"].get("online_rotations", 0) == 0
    model = load_model(stage)
    for name in quant.targets:  # the stored weights are the int8 grid itself
        weight = model.get_submodule(name).weight.detach()
        dequant = (quant.codes(name, weight).float() - 128) * quant.tensors[f"{name}.scale"]
        torch.testing.assert_close(dequant, weight, atol=1e-5, rtol=0)
    bad = tiny_recipe(tmp_path / "b.yaml", "tiny:llama", "  - int8: {online_hadamard: false, fallback: none}")
    result = cli("validate", str(bad))
    assert result.returncode == EXIT_BAD_INPUT and "online_hadamard" in result.stderr
    assert "rotate: true" in result.stderr and "Traceback" not in result.stderr


def test_rotation_refuses_moe_and_mla_before_work(tmp_path):
    for arch in ("qwen3_moe", "deepseek_v3"):
        stages = "  - int8: {rotate: true, fallback: none}"
        result = cli("validate", str(tiny_recipe(tmp_path / f"{arch}.yaml", f"tiny:{arch}", stages)))
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert result.returncode == EXIT_BAD_INPUT and len(lines) == 1, result.stderr
        assert "rotate" in lines[0] and arch in lines[0]
