"""gptq's bits_budget: sensitive weights kept at 8 bits within an average-bits budget, each weight on its own grid,
the choice in the report, exported to MatMulNBits of both widths and gated in ONNX Runtime; refusals in one line."""

import json
import math

import onnx
import pytest
import torch
from conftest import cli, tiny_recipe
from pydantic import ValidationError

import dscompress
from dscompress.compress.gptq.config import GPTQConfig, bits_per_weight
from dscompress.errors import EXIT_BAD_INPUT
from dscompress.export.onnx import ExportError
from dscompress.export.stage_export import export_stage
from dscompress.models.load import load_model
from dscompress.quant.qstate import QuantState, quantized_bytes

STAGE = (
    "  - name: mixed\n"
    "    gptq: {{bits: 4, group_size: 32, symmetric: false, bits_budget: {budget}, exclude: [embed_tokens]}}\n"
    "    gate: {{kl: {{max: 1.0}}}}\n"
    "    onnx: {{targets: [onnx-ort]}}"
)


def test_a_budget_keeps_the_most_sensitive_weights_at_8_bits_and_exports_both_widths(tmp_path):
    report = dscompress.run(tiny_recipe(tmp_path / "r.yaml", "tiny:qwen2", STAGE.format(budget=5.0)), tmp_path / "o")
    assert report["result"] == "passed"
    stage = report["stages"][1]
    mixed = stage["summary"]["mixed_precision"]
    assert bits_per_weight(4, 32) < mixed["average_bits"] <= 5.0
    state = QuantState.load(tmp_path / "o" / "1-mixed")
    high = {name for name in state.targets if state.bits_of(name) == 8}
    assert high == set(mixed["weights_at_high_bits"]) and 0 < len(high) < len(state.targets)
    assert mixed["most_sensitive"][0][1] >= mixed["most_sensitive"][-1][1]  # ranked by KL
    model = load_model(tmp_path / "o" / "1-mixed")
    for name in state.targets:  # every weight exactly on its own grid (8-bit codes reach past 15)
        w = model.get_submodule(name).weight.detach()
        codes = state.codes(name, w)
        assert int(codes.max()) <= 2 ** state.bits_of(name) - 1
        scale = state.tensors[f"{name}.scale"].repeat_interleave(32, 1)
        zero = state.tensors[f"{name}.zero"].repeat_interleave(32, 1)
        assert torch.allclose((codes - zero) * scale, w, atol=1e-6)
    assert any(int(state.codes(n, model.get_submodule(n).weight.detach()).max()) > 15 for n in high)
    graph = onnx.load(str(tmp_path / "o" / "1-mixed" / "onnx" / "onnx-ort" / "model.onnx")).graph
    widths = {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
    assert widths == {4, 8}
    assert all(v["passed"] for v in stage["verdicts"])  # the ONNX Runtime parity gates included
    with pytest.raises(ExportError, match="mixed-bit stage"):
        export_stage(tmp_path / "o" / "1-mixed", "onnx", tmp_path / "trt")
    stored = sum(quantized_bytes(math.prod(m["shape"]), state.bits_of(n), 32, m["shape"][-1]) * 8
                 for n, m in state.targets.items())  # fmt: skip
    assert stored / mixed["params_quantized"] == pytest.approx(mixed["average_bits"], abs=1e-4)
    saved = json.loads((tmp_path / "o" / "report.json").read_text())["stages"][1]
    assert saved["summary"]["mixed_precision"]["weights_at_high_bits"] == mixed["weights_at_high_bits"]


def test_impossible_budgets_and_conflicts_are_refused_in_one_line(tmp_path):
    with pytest.raises(ValidationError, match=r"below what 4-bit weights alone cost at group_size 64 \(4.312"):
        GPTQConfig(bits=4, group_size=64, bits_budget=4.2)
    with pytest.raises(ValidationError, match="set bits below 8"):
        GPTQConfig(bits=8, bits_budget=9)
    with pytest.raises(ValidationError, match="devices: 2 starts workers"):
        GPTQConfig(bits=4, group_size=64, bits_budget=5, devices=2)
    stages = STAGE.format(budget=5.0) + "\n    save_formats: [gptq_v2]"
    result = cli("validate", str(tiny_recipe(tmp_path / "r.yaml", "tiny:qwen2", stages)))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == EXIT_BAD_INPUT and len(lines) == 1, result.stderr
    assert "one bit width per checkpoint" in lines[0]


def test_the_sensitivity_from_a_layer_on_equals_the_kl_of_a_whole_forward():
    from dscompress.compress.gptq.budget import TOKENS, WINDOWS, _sensitivities
    from dscompress.compress.selection import selected
    from dscompress.context import StageContext
    from dscompress.models.sources import resolve
    from dscompress.quant.primitives import fake_quantize

    model = load_model(resolve("tiny:llama").directory).eval()
    calib = torch.randint(0, 256, (3, 300), generator=torch.Generator().manual_seed(3))
    config = GPTQConfig(bits=4, group_size=32, bits_budget=5, exclude=["embed_tokens"])
    with StageContext.standalone(model, calib, quiet=True) as ctx:
        linears = selected(list(ctx.adapter.weight_targets(model)), config.exclude)
        scores = _sensitivities(model, linears, config, ctx)
    ids = calib[:WINDOWS, :TOKENS]
    with torch.no_grad():
        ref = torch.log_softmax(model(ids).logits, -1)
        for t in (linears[0], linears[-2], linears[-1]):  # layer 0's first weight, the last layer's, lm_head
            kept = t.param.detach().clone()
            t.param.data.copy_(fake_quantize(kept, 4, 32, True)[0])
            logp = torch.log_softmax(model(ids).logits, -1)
            t.param.data.copy_(kept)
            assert scores[t.name] == pytest.approx(float((ref.exp() * (ref - logp)).sum(-1).mean()), rel=1e-3)
    assert set(scores) == {t.name for t in linears} and max(scores.values()) > 0


def test_validate_refuses_the_tensorrt_target_and_notes_the_cpu_kernel(tmp_path):
    trt = STAGE.format(budget=5.0).replace("[onnx-ort]", "[onnx-ort, onnx]")
    result = cli("validate", str(tiny_recipe(tmp_path / "a.yaml", "tiny:qwen2", trt)))
    assert result.returncode == EXIT_BAD_INPUT and "per-channel INT8" in result.stderr, result.stderr
    result = cli("validate", str(tiny_recipe(tmp_path / "b.yaml", "tiny:qwen2", STAGE.format(budget=5.0))))
    assert result.returncode == 0 and "gptq.activations: int8 runs its int8 path" in result.stdout + result.stderr
    with_int8 = STAGE.format(budget=5.0).replace("exclude:", "activations: int8, exclude:")
    result = cli("validate", str(tiny_recipe(tmp_path / "c.yaml", "tiny:qwen2", with_int8)))
    assert result.returncode == 0 and "int8 path" not in result.stdout + result.stderr
