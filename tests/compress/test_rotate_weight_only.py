"""Rotation before the weight-only passes (gptq, rtn): a stock checkpoint on its 4-bit grid, exported and gated in
ONNX Runtime; refusals before any compute."""

import pytest
import torch
from conftest import cli, tiny_recipe
from transformers import AutoModelForCausalLM

from dscompress import run as run_recipe
from dscompress.compress.gptq.apply import apply as gptq_apply
from dscompress.compress.gptq.config import GPTQConfig
from dscompress.context import StageContext
from dscompress.errors import EXIT_BAD_INPUT, RecipeError
from dscompress.models.load import load_model
from dscompress.models.sources import resolve
from dscompress.quant.qstate import QuantState


def _on_grid(state: QuantState, model, group: int) -> None:
    for name in state.targets:
        w = model.get_submodule(name).weight.detach()
        codes = state.codes(name, w)
        scale, zero = state.tensors[f"{name}.scale"], state.tensors[f"{name}.zero"]
        g = codes.shape[-1] // group
        rebuilt = (codes.float().reshape(*codes.shape[:-1], g, group) - zero.unsqueeze(-1)) * scale.unsqueeze(-1)
        assert torch.equal(rebuilt.reshape(w.shape), w), name


@pytest.mark.parametrize(("key", "arch", "export"), [("gptq", "qwen2", True), ("rtn", "llama", False)])
def test_rotated_weight_only_stage_is_a_stock_checkpoint_on_its_grid(tmp_path, key, arch, export):
    """The rotated stage is a stock checkpoint on its 4-bit grid; the GPTQ one (Qwen2: q/k/v biases) is also
    exported to `onnx-ort` and gated in ONNX Runtime (the rtn one takes the same exporter path)."""
    onnx = "\n    onnx: {targets: [onnx-ort], parity: {max_kl_diff: 0.001}}" if export else ""
    stages = (
        f"  - {key}: {{bits: 4, group_size: 32, symmetric: false, rotate: true}}\n    gate: {{kl: {{max: 1.0}}}}{onnx}"
    )
    report = run_recipe(tiny_recipe(tmp_path / "r.yaml", f"tiny:{arch}", stages), tmp_path / "out")
    assert report["result"] == "passed", report
    stage = tmp_path / "out" / f"1-{key}"
    summary = report["stages"][1]["summary"]
    tied = load_model(resolve(f"tiny:{arch}").directory).config.tie_word_embeddings
    assert summary["rotation"]["untied_embeddings"] == tied and summary["rotation"]["dtype"] == "float32"
    model = AutoModelForCausalLM.from_pretrained(stage)  # stock transformers, no dscompress code
    assert not model.config.tie_word_embeddings
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))  # folded into lm_head
    _on_grid(QuantState.load(stage), model, 32)
    verdicts = report["stages"][1]["verdicts"]
    assert all(v["passed"] for v in verdicts)
    if export:
        assert any("onnx-ort" in str(v) for v in verdicts), verdicts
        quantized = len(QuantState.load(stage).targets)
        assert report["stages"][1]["onnx"]["onnx-ort"]["quantization"]["matmulnbits"] == quantized


def test_gptq_with_rotation_called_from_python_stays_near_the_float_model():
    """The library call (no recipe): rotate=True at 8 bits per channel gives logits within 5% of fp32's range, and
    the summary states the rotation."""
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    directory = resolve("tiny:qwen2").directory
    ref = load_model(directory).eval()
    with torch.no_grad():
        expect = ref(ids).logits
    model = load_model(directory)
    with StageContext.standalone(model, calib, quiet=True) as ctx:
        out = gptq_apply(model, GPTQConfig(bits=8, group_size=-1, rotate=True), ctx)
    with torch.no_grad():
        got = out.model.eval()(ids).logits
    assert out.summary["rotation"]["residual"].startswith(str(model.config.hidden_size))
    assert (got - expect).abs().max() < 0.05 * expect.abs().max()


@pytest.mark.parametrize(
    ("arch", "stages", "expect"),
    [
        ("qwen3_moe", "  - gptq: {group_size: 32, rotate: true}", "rotate: rotation supports dense"),
        ("deepseek_v3", "  - rtn: {group_size: 32, rotate: true}", "rotate: rotation supports dense"),
        ("qwen2", "  - gptq: {group_size: 32, rotate: true, devices: 2}", "set devices: 1 or rotate: false"),
    ],
)
def test_rotation_before_weight_only_passes_is_refused_before_work(tmp_path, arch, stages, expect):
    result = cli("validate", str(tiny_recipe(tmp_path / "r.yaml", f"tiny:{arch}", stages)))
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == EXIT_BAD_INPUT and len(lines) == 1, result.stderr
    assert expect in lines[0] and "Traceback" not in result.stderr


def test_rotation_is_refused_with_a_streamed_model(tmp_path):
    path = tiny_recipe(tmp_path / "r.yaml", "tiny:qwen2", "  - gptq: {group_size: 32, rotate: true}")
    path.write_text(path.read_text().replace('"tiny:qwen2"}', '"tiny:qwen2", stream: true}', 1))
    result = cli("validate", str(path))
    assert result.returncode == EXIT_BAD_INPUT, result.stderr
    assert "rotate" in result.stderr and "model.stream" in result.stderr
    model = load_model(resolve("tiny:qwen3_moe").directory)
    calib = torch.zeros(1, 8, dtype=torch.long)
    with StageContext.standalone(model, calib, quiet=True) as ctx, pytest.raises(RecipeError, match="supports dense"):
        gptq_apply(model, GPTQConfig(group_size=32, rotate=True), ctx)
