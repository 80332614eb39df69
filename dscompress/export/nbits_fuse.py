"""One MatMulNBits for sibling projections: q/k/v, gate/up (any MatMulNBits nodes that read the same input with the
same K, bits, block size and accuracy level), followed by a Split.

At one decode token every MatMulNBits call has a fixed cost (threading, packing the activation) beside the weight
bytes it streams; fusing the siblings keeps the bytes and drops the calls (SmolLM2: 7 -> 4 per layer). The codes,
scales and zero points are stacked along N unchanged (each row's blocks are independent), so the fused node
computes exactly the same numbers.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper


def fuse_siblings(proto: onnx.ModelProto) -> int:
    """Fuse in place; returns how many MatMulNBits nodes were removed."""
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    groups = defaultdict(list)
    for node in graph.node:
        if node.op_type == "MatMulNBits" and node.domain == "com.microsoft" and len(node.input) <= 4:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if all(name in inits for name in node.input[1:]):
                key = (node.input[0], attrs["K"], attrs["bits"], attrs["block_size"], attrs.get("accuracy_level", 0),
                       len(node.input))  # fmt: skip
                groups[key].append(node)
    replaced, dropped, removed = {}, set(), 0
    for nodes in groups.values():
        if len(nodes) > 1:
            replaced[nodes[0].name] = _fused(nodes, inits, graph)
            dropped |= {n.name for n in nodes}
            removed += len(nodes) - 1
    if not replaced:
        return 0
    new_nodes = []
    for node in graph.node:
        if node.name in replaced:
            new_nodes.extend(replaced[node.name])
        elif node.name not in dropped:
            new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    used = {i for n in graph.node for i in n.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return removed


def _fused(nodes: list, inits: dict, graph) -> list:
    attrs = {a.name: helper.get_attribute_value(a) for a in nodes[0].attribute}
    sizes = [int(helper.get_attribute_value(next(a for a in n.attribute if a.name == "N"))) for n in nodes]
    name = nodes[0].name + ".fused"
    inputs = [nodes[0].input[0]]
    for slot in range(1, len(nodes[0].input)):
        stacked = np.concatenate([numpy_helper.to_array(inits[n.input[slot]]) for n in nodes], axis=0)
        graph.initializer.append(numpy_helper.from_array(stacked, f"{name}.{slot}"))
        inputs.append(f"{name}.{slot}")
    graph.initializer.append(numpy_helper.from_array(np.array(sizes, np.int64), f"{name}.split"))
    attrs["N"] = sum(sizes)
    matmul = helper.make_node("MatMulNBits", inputs, [f"{name}.out"], name=name, domain="com.microsoft", **attrs)
    split = helper.make_node(
        "Split", [f"{name}.out", f"{name}.split"], [n.output[0] for n in nodes], name=f"{name}.split", axis=-1
    )
    return [matmul, split]
