"""`activations: int8` on the weight-only passes: the stage computes what ONNX Runtime's MatMulNBits computes at
accuracy_level 4 (int8 inputs per block of group_size), the onnx-ort export runs at that level and matches the
stage, and every combination that cannot hold is refused in one line."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import cli, tiny_recipe
from onnx import TensorProto, helper, numpy_helper
from pydantic import ValidationError

import dscompress
from dscompress.compress.gptq.config import GPTQConfig
from dscompress.compress.rtn.config import RTNConfig
from dscompress.errors import EXIT_BAD_INPUT
from dscompress.export.onnx import ExportError
from dscompress.export.ort_runner import OrtLM
from dscompress.export.stage_export import export_stage
from dscompress.models.load import load_model
from dscompress.quant.actquant import attach_saved, detach, fake_quant_int8_blocks
from dscompress.quant.qstate import QuantState


def _identity_matmulnbits(k: int, block: int, bits: int) -> ort.InferenceSession:
    """MatMulNBits at accuracy_level 4 whose weight is the identity (code 1, zero point 0, scale 1): its output is
    the kernel's own int8-quantized input, q * amax / 127."""
    codes = np.eye(k, dtype=np.uint8).reshape(k, k // block, block)
    packed = codes if bits == 8 else codes[..., 0::2] | (codes[..., 1::2] << 4)
    zeros = np.zeros((k, k // block), np.uint8)
    zeros = zeros if bits == 8 else zeros[:, 0::2] | (zeros[:, 1::2] << 4)
    inits = [numpy_helper.from_array(packed, "W"), numpy_helper.from_array(np.ones(k * (k // block), np.float32), "S"),
             numpy_helper.from_array(zeros.reshape(-1), "Z")]  # fmt: skip
    node = helper.make_node("MatMulNBits", ["A", "W", "S", "Z"], ["Y"], domain="com.microsoft", K=k, N=k, bits=bits,
                            block_size=block, accuracy_level=4)  # fmt: skip
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", k])], inits)  # fmt: skip
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _ties(m: int, k: int, block: int, rng) -> np.ndarray:
    """Inputs where most products x * 127 / amax land on .5 (where the rounding rule decides), one all-zero
    block, and some plain random blocks."""
    scale = np.exp(rng.standard_normal((m, k // block, 1))).astype(np.float32)
    halves = (rng.integers(-126, 126, (m, k // block, block)) + 0.5).astype(np.float32) * scale
    halves[..., 0] = 127 * scale[..., 0]
    plain = (rng.standard_normal((m, k // block, block)) * 3).astype(np.float32)
    x = np.where(rng.random((m, k // block, 1)) < 0.7, halves, plain).reshape(m, k).astype(np.float32)
    x[0, :block] = 0
    return x


@pytest.mark.parametrize("bits,block", [(4, 32), (4, 64), (8, 64), (4, 128)])
def test_the_block_quantizer_is_the_kernels_own(bits, block):
    """Measured bit-exact when written (0 of 196,608 values per width and block, decode and prefill shapes, inputs
    mostly rounding ties); a rule that rounds ties away from zero or multiplies by 1/scale differs in 4-36%."""
    k, rng = 512, np.random.default_rng(0)
    session = _identity_matmulnbits(k, block, bits)
    for m in (1, 3, 40):
        x = _ties(m, k, block, rng)
        kernel = torch.from_numpy(session.run(None, {"A": x})[0])
        ours = fake_quant_int8_blocks(torch.from_numpy(x), block)
        assert float((kernel != ours).float().mean()) < 1e-3, (m, int((kernel != ours).sum()))
        assert float((kernel - ours).abs().max()) < float(np.abs(x).max()) / 100  # at most a rare tie, one step


WEIGHT_ONLY = (
    "  - name: w4a8\n"
    "    rtn: {bits: 4, group_size: 32, symmetric: false, exclude: [embed_tokens], activations: int8}\n"
    "    gate: {kl: {max: 1.0}}"
)
STAGE = WEIGHT_ONLY + "\n    onnx: {targets: [onnx-ort]}"


def test_an_int8_activation_stage_is_gated_on_what_onnx_runtime_computes(tmp_path):
    report = dscompress.run(tiny_recipe(tmp_path / "r.yaml", "tiny:qwen2", STAGE), tmp_path / "o")
    assert report["result"] == "passed"
    stage_dir = tmp_path / "o" / "1-w4a8"
    state = QuantState.load(stage_dir)
    assert state.block_activations and set(state.activations) == set(state.targets)
    assert {a["block"] for a in state.activations.values()} == {32}
    meta = json.loads((stage_dir / "onnx" / "onnx-ort" / "export.json").read_text())
    assert meta["accuracy_level"] == 4
    graph = onnx.load(str(stage_dir / "onnx" / "onnx-ort" / "model.onnx")).graph
    levels = [a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"]
    assert levels and set(levels) == {4} and len(levels) == sum(n.op_type == "MatMulNBits" for n in graph.node)
    # the stage computes the kernel's arithmetic: ONNX Runtime is closer to it than to the float-activation model
    model, lm = load_model(stage_dir).eval(), OrtLM(stage_dir / "onnx" / "onnx-ort")
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    graph_logits = lm.logits(ids)
    with torch.no_grad():
        float_acts = model(ids).logits
        assert attach_saved(model, stage_dir) == sorted(state.targets)
        int8_acts = model(ids).logits
    detach(model)
    # Positions whose logits equal the stage's to float rounding: ONNX Runtime quantizes each block as the stage
    # does. Not all: a value a float ulp from a rounding tie (the two RMSNorms differ in ulps) can round the other
    # way, and attention carries that step to the later positions (docs/EXPORT.md, "activations: int8").
    same = lambda other: float(((graph_logits - other).abs().amax(-1) < 1e-4).float().mean())  # noqa: E731
    assert same(int8_acts) >= 0.3 and same(float_acts) == 0.0
    mean = lambda other: float((graph_logits - other).abs().mean())  # noqa: E731
    assert mean(int8_acts) < mean(float_acts) / 2
    stage = report["stages"][1]
    assert all(v["passed"] for v in stage["verdicts"])  # ONNX Runtime parity included
    assert stage["metrics"]["kl"] > 0


def test_the_export_keeps_the_stage_s_arithmetic_or_refuses(tmp_path):
    dscompress.run(tiny_recipe(tmp_path / "r.yaml", "tiny:llama", WEIGHT_ONLY), tmp_path / "o")
    stage_dir = tmp_path / "o" / "1-w4a8"
    with pytest.raises(ExportError, match="accuracy_level 4; another level computes a different model"):
        export_stage(stage_dir, "onnx-ort", tmp_path / "x", accuracy_level=0)
    with pytest.raises(ExportError, match="TensorRT quantizes activations per tensor"):
        export_stage(stage_dir, "onnx", tmp_path / "y")
    assert export_stage(stage_dir, "onnx-ort", tmp_path / "z")["accuracy_level"] == 4


def test_impossible_combinations_are_refused_in_one_line(tmp_path):
    with pytest.raises(ValidationError, match="for 4- and 8-bit weights, not bits: 3"):
        RTNConfig(bits=3, group_size=64, activations="int8")
    with pytest.raises(ValidationError, match="group_size: -1 has none that MatMulNBits takes"):
        GPTQConfig(bits=4, group_size=-1, activations="int8")
    with pytest.raises(ValidationError, match="Input should be 'float' or 'int8'"):
        GPTQConfig(activations="int4")
    cases = {
        STAGE.replace("[onnx-ort]", "[onnx]"): "the onnx target (TensorRT) quantizes them per tensor",
        STAGE.replace("[onnx-ort]}", "[onnx-ort], accuracy_level: 0}"): "remove accuracy_level (4 is used)",
    }
    for stages, message in cases.items():
        result = cli("validate", str(tiny_recipe(tmp_path / "r.yaml", "tiny:qwen2", stages)))
        lines = result.stderr.strip().splitlines()
        assert result.returncode == EXIT_BAD_INPUT and len(lines) == 1, result.stderr
        assert message in lines[0]
    result = cli("validate", str(tiny_recipe(tmp_path / "m.yaml", "tiny:qwen3_moe", STAGE)))
    assert result.returncode == EXIT_BAD_INPUT and "MoE expert stacks are not exported as MatMulNBits" in result.stderr
