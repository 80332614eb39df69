"""Rewrite an exported float graph into its quantized form, from the stage's stored grid and scales.

The float export holds each Linear's dequantized weight as a transposed (in, out) initializer feeding a MatMul.
Because the stored weights sit exactly on their grid, each initializer is matched to its Linear by content, and
its integer codes come back exactly from quantization.safetensors (nothing is re-quantized).

Targets:
- `onnx` (standard operators, TensorRT's explicit-quantization rules, docs/DESIGN.md "ONNX INT4 and INT8"):
  - int8 weights: int8 initializer + DequantizeLinear, per output channel (axis 1 of the (in, out) weight),
    zero point 0;
  - int8 activations: QuantizeLinear -> DequantizeLinear on the MatMul input, per tensor, zero point 0, with the
    stage's calibrated scale; Linears whose activations fell back keep a float input (W8A16);
  - int4 weights: INT4 initializer + DequantizeLinear with `block_size` (opset 21), symmetric only (TensorRT
    needs zero points of 0).
- `onnx-ort` and `ort-genai`: int4 weights become com.microsoft MatMulNBits (asymmetric zero points supported;
  `accuracy_level` as asked, 4 = int8 activations inside the kernel); static int8 as `onnx` (ONNX Runtime fuses
  the Q/DQ pairs into its integer kernels); dynamic per-token int8 activations (ONNX Runtime only) as
      s = Max(ReduceMax(Abs(x), -1) * (1/127), 1e-8);  x_u8 = Cast<uint8>(Round(x / s) + 128)     (once per tensor)
      y = Mul(Mul(Cast<float>(MatMulInteger(x_u8, W_s8, 128)), w_scale), s)                      (per Linear)
  in standard operators. Measured on 2 CPU threads (docs/DESIGN.md, "Dynamic per-token int8 on ONNX Runtime"):
  ONNX Runtime's MatMulInteger is fast for uint8 x int8 (MLAS) and 9x slower than float32 for int8 x int8, so
  the symmetric activation codes are stored as uint8 with a constant zero point of 128; the codes stay in
  [1, 255] because |x / s| <= 127, so no Clip is needed.
Routed-expert weights stay as their dequantized float values (exact, not smaller).
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from dscompress.export.onnx import OPSET, OPSET_INT4, ExportError
from dscompress.quant.actquant import INV_127, SCALE_FLOOR
from dscompress.quant.hadamard import sylvester
from dscompress.quant.qstate import QuantState

TARGETS = ("onnx", "onnx-ort", "ort-genai")
ORT_TARGETS = ("onnx-ort", "ort-genai")  # run by ONNX Runtime: MatMulNBits for INT4


def _digest(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def linear_weights(model: torch.nn.Module, quant: QuantState) -> dict[str, tuple[str, torch.Tensor]]:
    """{digest of W.T as float32: (Linear name, W (out, in))} for every quantized Linear."""
    found = {}
    for name, meta in quant.targets.items():
        if meta["kind"] != "linear":
            continue
        weight = model.get_submodule(name).weight.detach().float().cpu()
        found[_digest(weight.T.numpy())] = (name, weight)
    return found


class Rewriter:
    def __init__(self, graph: onnx.GraphProto, quant: QuantState, target: str):
        self.graph, self.quant, self.target = graph, quant, target
        self.accuracy_level = 0  # MatMulNBits: 0 = the kernel's default (float activations), 4 = int8
        self.inits = {i.name: i for i in graph.initializer}
        self.new_nodes: list[onnx.NodeProto] = []
        # (tensor, static scale | None for per token | "hadamardAxB") -> the name its nodes go by
        self.act_qdq: dict[tuple[str, float | str | None], str] = {}
        self.counts = {"int8_weights": 0, "int8_activations": 0, "int4_dq": 0, "matmulnbits": 0}

    def add_init(self, name: str, array: np.ndarray, data_type: int | None = None) -> str:
        if data_type is None:
            tensor = numpy_helper.from_array(array, name)
        else:  # int4 / uint4: onnx packs two per byte from the flat values
            tensor = helper.make_tensor(name, data_type, array.shape, array.flatten().tolist())
        self.graph.initializer.append(tensor)
        return name

    def activation(self, tensor: str, scale: float) -> str:
        key = (tensor, scale)
        if key not in self.act_qdq:
            base = f"{tensor}_q{len(self.act_qdq)}"
            s = self.add_init(f"{base}.scale", np.array(scale, dtype=np.float32))
            z = self.add_init(f"{base}.zero_point", np.array(0, dtype=np.int8))
            self.new_nodes += [
                helper.make_node("QuantizeLinear", [tensor, s, z], [f"{base}.int8"], name=f"{base}/Q"),
                helper.make_node("DequantizeLinear", [f"{base}.int8", s, z], [f"{base}.dq"], name=f"{base}/DQ"),
            ]
            self.act_qdq[key] = f"{base}.dq"
            self.counts["int8_activations"] += 1
        return self.act_qdq[key]

    def dynamic_activation(self, tensor: str) -> tuple[str, str]:
        """Per-token uint8 codes of `tensor` and their float scales (..., 1): built once per tensor."""
        key = (tensor, None)
        if key not in self.act_qdq:
            base = f"{tensor}_dq{len(self.act_qdq)}"
            c = {k: f"{base}.{k}" for k in ("axes", "inv", "floor", "offset", "zero")}
            self.add_init(c["axes"], np.array([-1], dtype=np.int64))
            self.add_init(c["inv"], np.array(INV_127, dtype=np.float32))
            self.add_init(c["floor"], np.array(SCALE_FLOOR, dtype=np.float32))
            self.add_init(c["offset"], np.array(128, dtype=np.float32))
            self.add_init(c["zero"], np.array(128, dtype=np.uint8))
            node = helper.make_node
            self.new_nodes += [
                node("Abs", [tensor], [f"{base}.abs"]),
                node("ReduceMax", [f"{base}.abs", c["axes"]], [f"{base}.amax"], keepdims=1),
                node("Mul", [f"{base}.amax", c["inv"]], [f"{base}.scale0"]),
                node("Max", [f"{base}.scale0", c["floor"]], [f"{base}.scale"]),
                node("Div", [tensor, f"{base}.scale"], [f"{base}.div"]),
                node("Round", [f"{base}.div"], [f"{base}.round"]),
                node("Add", [f"{base}.round", c["offset"]], [f"{base}.shift"]),
                node("Cast", [f"{base}.shift"], [f"{base}.u8"], to=TensorProto.UINT8),
            ]
            self.act_qdq[key] = base
            self.counts["int8_dynamic_activations"] = self.counts.get("int8_dynamic_activations", 0) + 1
        base = self.act_qdq[key]
        return f"{base}.u8", f"{base}.scale"

    def hadamard(self, tensor: str, a: int, b: int) -> str:
        """`tensor` @ M, the online block Hadamard rotation (quant/hadamard.py), built once per tensor."""
        key = (tensor, f"hadamard{a}x{b}")
        if key not in self.act_qdq:
            base = f"{tensor}_h{len(self.act_qdq)}"
            ha = self.add_init(f"{base}.ha", sylvester(a).numpy().astype(np.float32))
            hb = self.add_init(f"{base}.hb", sylvester(b).numpy().astype(np.float32))
            blocks = self.add_init(f"{base}.blocks", np.array([0, 0, -1, a, b], dtype=np.int64))
            flat = self.add_init(f"{base}.flat", np.array([0, 0, -1], dtype=np.int64))
            self.new_nodes += [
                helper.make_node("Reshape", [tensor, blocks], [f"{base}.blocked"]),
                helper.make_node("MatMul", [f"{base}.blocked", hb], [f"{base}.right"]),
                helper.make_node("MatMul", [ha, f"{base}.right"], [f"{base}.both"]),
                helper.make_node("Reshape", [f"{base}.both", flat], [f"{base}.rotated"]),
            ]
            self.act_qdq[key] = f"{base}.rotated"
            self.counts["online_rotations"] = self.counts.get("online_rotations", 0) + 1
        return self.act_qdq[key]

    def dynamic_matmul(self, node: onnx.NodeProto, name: str, weight: torch.Tensor, prefix: str, x: str) -> None:
        """The MatMul of `node` on input `x` as per-token int8 x per-channel int8 with int32 accumulation."""
        codes, scale, _ = self.int8_codes(name, weight, prefix)
        x_u8, x_scale = self.dynamic_activation(x)
        zero = self.act_qdq[(x, None)] + ".zero"
        self.new_nodes += [
            helper.make_node("MatMulInteger", [x_u8, codes, zero], [f"{prefix}.acc"]),
            helper.make_node("Cast", [f"{prefix}.acc"], [f"{prefix}.accf"], to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"{prefix}.accf", scale], [f"{prefix}.cols"]),
            helper.make_node("Mul", [f"{prefix}.cols", x_scale], list(node.output), name=node.name),
        ]
        self.counts["int8_weights"] += 1

    def int8_codes(self, name: str, weight: torch.Tensor, prefix: str) -> tuple[str, str, str]:
        """Initializers of a Linear's int8 weight (in, out), per-output-channel scale and zero point 0."""
        codes = self.quant.codes(name, weight).to(torch.int16) - 128  # unsigned storage -> signed, zero 0
        scale = self.quant.tensors[f"{name}.scale"].reshape(-1).numpy().astype(np.float32)
        q = self.add_init(f"{prefix}.int8", codes.T.contiguous().numpy().astype(np.int8))
        s = self.add_init(f"{prefix}.scale", scale)
        z = self.add_init(f"{prefix}.zero_point", np.zeros_like(scale, dtype=np.int8))
        return q, s, z

    def int8_weight(self, name: str, weight: torch.Tensor, prefix: str) -> str:
        q, s, z = self.int8_codes(name, weight, prefix)
        self.new_nodes.append(helper.make_node("DequantizeLinear", [q, s, z], [f"{prefix}.dq"], axis=1))
        self.counts["int8_weights"] += 1
        return f"{prefix}.dq"

    def int4_weight(self, name: str, weight: torch.Tensor, prefix: str) -> str:
        q = self.quant
        if not q.symmetric:
            raise ExportError(
                f"{name}: asymmetric INT4 has nonzero zero points, which TensorRT's DequantizeLinear rejects; "
                "use the onnx-ort target, or quantize with symmetric: true"
            )
        group = weight.shape[1] if q.group_size == -1 else q.group_size
        codes = (q.codes(name, weight).to(torch.int16) - 8).T.contiguous().numpy()  # (in, out) signed int4
        scale = q.tensors[f"{name}.scale"].T.contiguous().numpy().astype(np.float32)  # (groups, out)
        w = self.add_init(f"{prefix}.int4", codes, TensorProto.INT4)
        s = self.add_init(f"{prefix}.scale", scale)
        self.new_nodes.append(helper.make_node("DequantizeLinear", [w, s], [f"{prefix}.dq"], axis=0, block_size=group))
        self.counts["int4_dq"] += 1
        return f"{prefix}.dq"

    def matmul_nbits(self, node: onnx.NodeProto, name: str, weight: torch.Tensor, prefix: str) -> onnx.NodeProto:
        q = self.quant
        n, k = weight.shape
        block = k if q.group_size == -1 else q.group_size
        if block < 16 or block & (block - 1):
            raise ExportError(f"{name}: MatMulNBits needs a power-of-two block of at least 16, got {block}")
        bits = q.bits_of(name)
        codes = q.codes(name, weight).reshape(n, k // block, block).numpy().astype(np.uint8)
        packed = codes if bits == 8 else codes[..., 0::2] | (codes[..., 1::2] << 4)  # low nibble first
        inputs = [
            node.input[0],
            self.add_init(f"{prefix}.B", packed),
            self.add_init(f"{prefix}.scales", q.tensors[f"{name}.scale"].reshape(-1).numpy().astype(np.float32)),
        ]
        if not q.symmetric:
            zero = q.tensors[f"{name}.zero"].numpy().astype(np.uint8)  # (n, blocks)
            if bits == 4:  # two per byte, each row padded to whole bytes
                if zero.shape[1] % 2:
                    zero = np.concatenate([zero, np.full((n, 1), 8, np.uint8)], axis=1)
                zero = zero[:, 0::2] | (zero[:, 1::2] << 4)
            inputs.append(self.add_init(f"{prefix}.zero_points", zero.reshape(-1)))
        self.counts["matmulnbits"] += 1
        return helper.make_node(
            "MatMulNBits",
            inputs,
            list(node.output),
            name=node.name or prefix,
            domain="com.microsoft",
            K=k,
            N=n,
            bits=bits,
            block_size=block,
            **({"accuracy_level": self.accuracy_level} if self.accuracy_level else {}),
        )


def _weight_of(node, inits: dict, producers: dict, lookup: dict):
    """((Linear name, W), initializer) when `node` is a MatMul by a quantized Linear's weight, else (None, None).

    The weight is either its own transposed initializer, or (tied embeddings) a Transpose of the shared one.
    """
    if node.op_type != "MatMul" or len(node.input) != 2:
        return None, None
    init, transpose = inits.get(node.input[1]), False
    if init is None and (src := producers.get(node.input[1])) is not None and src.op_type == "Transpose":
        perm = [list(a.ints) for a in src.attribute if a.name == "perm"]
        init, transpose = inits.get(src.input[0]), perm in ([[1, 0]], [])
    if init is None or len(init.dims) != 2:
        return None, None
    array = numpy_helper.to_array(init)
    hit = lookup.get(_digest(array.T if transpose else array))
    return (hit, init) if hit is not None else (None, None)


def _without_dead_transposes(nodes: list, graph) -> list:
    """Drop Transpose nodes whose output nothing reads any more (a tied lm_head's, once it reads its codes)."""
    used = {i for n in nodes for i in n.input} | {o.name for o in graph.output}
    return [n for n in nodes if n.op_type != "Transpose" or any(o in used for o in n.output)]


def check_exportable(quant: QuantState | None, target: str, opset: int = OPSET) -> None:
    """Every refusal that the stage's quantization.json decides, raised before the model is even loaded."""
    if quant is None:
        return
    if quant.dynamic_activations and target not in ORT_TARGETS:
        raise ExportError(
            "dynamic per-token int8 activations run in ONNX Runtime; TensorRT's INT8 is static, per tensor. Fix: "
            "export with --format onnx-ort, or quantize with int8.activations: static"
        )
    if quant.block_activations and target not in ORT_TARGETS:
        raise ExportError(
            "activations: int8 (per block, inside MatMulNBits) runs in ONNX Runtime; TensorRT quantizes "
            "activations per tensor. Fix: export with --format onnx-ort, or quantize with activations: float"
        )
    if quant.bits not in (4, 8):
        raise ExportError(f"{quant.bits}-bit weights have no ONNX integer type here; export 4- or 8-bit stages")
    if quant.mixed and target not in ORT_TARGETS:
        raise ExportError(
            "a mixed-bit stage (bits_budget) has group-wise 8-bit weights, which the onnx target (TensorRT, per-"
            "channel INT8) does not take. Fix: export with --format onnx-ort, or remove bits_budget"
        )
    if quant.bits == 4 and target == "onnx":
        if not quant.symmetric:
            raise ExportError(
                "asymmetric INT4 has nonzero zero points, which TensorRT's DequantizeLinear rejects. Fix: use "
                "--format onnx-ort, or quantize with symmetric: true"
            )
        if opset < OPSET_INT4:
            raise ExportError(f"INT4 DequantizeLinear with block_size needs opset {OPSET_INT4}, not {opset}")


def quantize_graph(model_proto: onnx.ModelProto, model: torch.nn.Module, quant: QuantState, target: str,
                   accuracy_level: int = 0) -> dict:  # fmt: skip
    """Rewrite `model_proto` in place for `target`; returns counts of what was rewritten."""
    if target not in TARGETS:
        raise ExportError(f"unknown ONNX target {target!r}; allowed: {', '.join(TARGETS)}")
    check_exportable(quant, target)
    graph = model_proto.graph
    lookup = linear_weights(model, quant)
    rw = Rewriter(graph, quant, target)
    rw.accuracy_level = accuracy_level
    used_weights: set[str] = set()
    nodes = []
    producers = {out: n for n in graph.node for out in n.output}
    for node in graph.node:
        hit, init = _weight_of(node, rw.inits, producers, lookup)
        if hit is None:
            nodes.append(node)
            continue
        name, weight = hit
        prefix = f"{name}.weight_q"
        used_weights.add(init.name)
        act = quant.activations.get(name) or {"precision": "float"}
        # MatMulNBits: every 4-bit weight, and the 8-bit ones of mixed stages and of activations: int8
        if target in ORT_TARGETS and (quant.bits_of(name) == 4 or quant.mixed or act.get("mode") == "block"):
            nodes.append(rw.matmul_nbits(node, name, weight, prefix))
            continue
        a = node.input[0]
        if rotation := quant.targets[name].get("rotation"):  # the codes are in the rotated basis
            a = rw.hadamard(a, *rotation)
        if act["precision"] == "int8" and act.get("mode") == "dynamic":
            rw.dynamic_matmul(node, name, weight, prefix, a)
        else:
            b = rw.int8_weight(name, weight, prefix) if quant.bits == 8 else rw.int4_weight(name, weight, prefix)
            if act["precision"] == "int8":
                a = rw.activation(a, float(quant.tensors[f"{name}.input_scale"]))
            rw.new_nodes.append(helper.make_node("MatMul", [a, b], list(node.output), name=node.name))
        nodes.extend(rw.new_nodes)
        rw.new_nodes = []
    del graph.node[:]
    graph.node.extend(_without_dead_transposes(nodes, graph))
    still_used = {i for n in graph.node for i in n.input}
    keep = [i for i in graph.initializer if i.name not in used_weights or i.name in still_used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    if rw.counts["matmulnbits"] and not any(o.domain == "com.microsoft" for o in model_proto.opset_import):
        model_proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    rw.counts["quantized_linears"] = len(used_weights)
    rw.counts["expected_linears"] = len(lookup)
    return rw.counts
