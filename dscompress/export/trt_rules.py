"""Checks that an `onnx`-target graph is one TensorRT's ONNX parser takes, without TensorRT installed.

Operators: the standard-domain operators the onnx-tensorrt parser supports that our exports use (TensorRT 10
`docs/operators.md` in onnx/onnx-tensorrt); no custom domains. Q/DQ forms (onnx-tensorrt
QuantDequantLinearHelper, docs/DESIGN.md "ONNX INT4 and INT8"): zero points are constant 0; scales are positive
constants; activations are quantized per tensor (scalar scale); int8 weights are per channel (1-D scale) and INT4
weights are block-wise (DequantizeLinear `block_size`, scale of the weight's rank).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

TRT_OPERATORS = frozenset({
    "Abs", "Add", "And", "ArgMax", "Cast", "Ceil", "Clip", "Concat", "Constant", "ConstantOfShape", "Cos", "CumSum",
    "DequantizeLinear", "Div", "Einsum", "Equal", "Erf", "Exp", "Expand", "Flatten", "Floor", "Gather",
    "GatherElements", "GatherND", "Gemm", "Greater", "GreaterOrEqual", "Identity", "If", "IsInf", "IsNaN",
    "LayerNormalization", "Less", "LessOrEqual", "Log", "MatMul", "Max", "Mean", "Min", "Mod", "Mul", "Neg", "Not",
    "Or", "Pad", "Pow", "QuantizeLinear", "Range", "Reciprocal", "ReduceMax", "ReduceMean", "ReduceMin",
    "ReduceProd", "ReduceSum", "Relu", "Reshape", "ScatterElements", "ScatterND", "Shape", "Sigmoid", "Sign", "Sin",
    "Slice", "Softmax", "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Tanh", "Tile", "TopK", "Transpose", "Trilu",
    "Unsqueeze", "Where", "Xor",
})  # fmt: skip
MAX_OPSET = 21


def check(model: onnx.ModelProto, base_dir: str = "") -> list[str]:
    """Every rule the graph breaks, one line each (empty: TensorRT's parser takes it). base_dir: where a model
    loaded without its external data keeps it (scales are read from there)."""
    problems = []
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset > MAX_OPSET:
        problems.append(f"opset {opset} is above {MAX_OPSET}, the newest TensorRT 10 parses")
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        where = f"node {node.name or node.output[0]} ({node.op_type})"
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{where}: custom domain {node.domain!r} is not a TensorRT operator")
        elif node.op_type not in TRT_OPERATORS:
            problems.append(f"{where}: not in TensorRT's supported operators")
        elif node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            problems.extend(f"{where}: {p}" for p in _qdq_problems(node, inits, base_dir))
    return problems


def _qdq_problems(node: onnx.NodeProto, inits: dict, base_dir: str) -> list[str]:
    problems = []
    scale = inits.get(node.input[1])
    if scale is None:
        return ["scale is not a constant initializer"]
    s = numpy_helper.to_array(scale, base_dir)
    if not np.all(s > 0):
        problems.append("scale has non-positive values")
    if len(node.input) > 2 and node.input[2]:
        zero = inits.get(node.input[2])
        if zero is None or np.any(numpy_helper.to_array(zero, base_dir) != 0):
            problems.append("zero point is not a constant 0")
    weight = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if weight is None and s.ndim != 0:
        problems.append(f"activation scale has shape {list(s.shape)}; activations must be per tensor")
    if weight is not None:
        blocked = attrs.get("block_size", 0) > 0
        if blocked and s.ndim != len(weight.dims):
            problems.append("block-wise scale must have the weight's rank")
        if not blocked and s.ndim > 1:
            problems.append(f"per-channel weight scale must be 1-D, got {list(s.shape)}")
    return problems
