"""The onnx-ort graph with ONNX Runtime's GroupQueryAttention (export/gqa.py) and sibling MatMulNBits fused into one
(export/nbits_fuse.py): the same numbers as torch, the fused operators really in the graph, refusals named."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from dscompress.export import gqa
from dscompress.export.nbits_fuse import fuse_siblings
from dscompress.export.ort_runner import OrtLM, torch_greedy
from dscompress.export.stage_export import export_stage
from dscompress.models.load import load_model
from dscompress.models.sources import resolve


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_onnx_ort_attention_is_one_group_query_attention_per_layer_and_matches_torch(tmp_path, arch):
    stage = resolve(f"tiny:{arch}").directory
    meta = export_stage(stage, "onnx-ort", tmp_path / "onnx")
    assert meta["attention"] == "GroupQueryAttention"
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("GroupQueryAttention") == meta["layout"]["layers"]
    assert "Softmax" not in ops and "Expand" not in ops  # no attention left in small operators
    assert [i.name for i in graph.input][:3] == ["input_ids", "attention_mask", "position_ids"]
    lm, model = OrtLM(tmp_path / "onnx"), load_model(stage).eval()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits
    assert float((lm.logits(ids) - full).abs().max()) < 1e-4
    logits, past = lm.step(ids[:, :10].numpy(), lm.empty_past(2), 0)  # prefill, then the cache one by one
    steps = [logits]
    for pos in range(10, 24):
        logits, past = lm.step(ids[:, pos : pos + 1].numpy(), past, pos)
        steps.append(logits)
    assert float((torch.from_numpy(np.concatenate(steps, 1)) - full).abs().max()) < 1e-4
    assert lm.greedy(ids[0, :8], 12)[0] == torch_greedy(model, ids[0, :8], 12)


def test_the_traced_decoder_computes_what_the_model_computes_in_torch():
    """GqaDecoder with the custom op's eager reference is the model itself (the loop, norms, rotary, scale)."""
    model = load_model(resolve("tiny:qwen3").directory).eval()
    layers = model.config.num_hidden_layers
    decoder = gqa.GqaDecoder(model, layers)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    kv = model.config.num_key_value_heads
    past = [torch.zeros(1, kv, 0, model.model.layers[0].self_attn.head_dim)] * (2 * layers)
    with torch.no_grad():
        out = decoder(ids, torch.ones_like(ids), torch.arange(16)[None], *past)
        assert float((out[0] - model(ids).logits).abs().max()) < 1e-5
    assert out[1].shape == (1, kv, 16, model.model.layers[0].self_attn.head_dim)


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_models_outside_its_cover_keep_standard_attention_with_the_reason(arch):
    model = load_model(resolve(f"tiny:{arch}").directory)
    assert arch in gqa.refusal(model)


def test_rotary_that_changes_with_length_keeps_standard_attention():
    model = load_model(resolve("tiny:llama").directory)
    model.config.rope_parameters = dict(model.config.rope_parameters or {}, rope_type="dynamic")
    assert "dynamic" in gqa.refusal(model)


def _nbits_graph(bits: int, sizes: list[int], k: int = 64, block: int = 32) -> onnx.ModelProto:
    rng = np.random.default_rng(bits)
    per_byte = 8 // bits
    inits, nodes = [], []
    for i, n in enumerate(sizes):
        blocks = k // block
        inits += [
            numpy_helper.from_array(rng.integers(0, 256, (n, blocks, block // per_byte), dtype=np.uint8), f"b{i}"),
            numpy_helper.from_array(rng.random(n * blocks, dtype=np.float32), f"s{i}"),
            numpy_helper.from_array(rng.integers(0, 256, n * ((blocks * bits + 7) // 8), dtype=np.uint8), f"z{i}"),
        ]
        nodes.append(helper.make_node("MatMulNBits", ["x", f"b{i}", f"s{i}", f"z{i}"], [f"y{i}"], name=f"m{i}",
                                      domain="com.microsoft", K=k, N=n, bits=bits, block_size=block))  # fmt: skip
    outputs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(len(sizes))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])], outputs,
                              inits)  # fmt: skip
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


@pytest.mark.parametrize("bits", [4, 8])
def test_sibling_matmulnbits_fuse_into_one_with_identical_outputs(bits):
    proto = _nbits_graph(bits, [48, 16, 16])
    x = np.random.default_rng(0).random((1, 64), dtype=np.float32)
    before = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})
    assert fuse_siblings(proto) == 2
    assert [n.op_type for n in proto.graph.node] == ["MatMulNBits", "Split"]
    after = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)


def test_matmulnbits_of_different_widths_stay_apart():
    four, eight = _nbits_graph(4, [16]), _nbits_graph(8, [16])
    eight.graph.node[0].output[0] = "y1"
    eight.graph.node[0].name = "m1"
    for proto_part in ("b0", "s0", "z0"):
        init = next(i for i in eight.graph.initializer if i.name == proto_part)
        init.name = proto_part.replace("0", "1")
    eight.graph.node[0].input[1:] = ["b1", "s1", "z1"]
    four.graph.node.extend(eight.graph.node)
    four.graph.initializer.extend(eight.graph.initializer)
    four.graph.output.append(helper.make_tensor_value_info("y1", TensorProto.FLOAT, None))
    assert fuse_siblings(four) == 0
