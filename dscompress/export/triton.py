"""`dscompress bundle STAGE --target triton`: a Triton Inference Server model repository for the stage's ONNX
Runtime export, and a client that generates greedily against a server.

bundle/
  model_repository/<name>/config.pbtxt     onnxruntime backend, dynamic batching, instance groups, every input and
                                           output of the graph (the KV cache included) with its type and dims
  model_repository/<name>/1/model.onnx     the `onnx-ort` export (+ model.onnx.data): what Triton's onnxruntime
                                           backend runs is a default ONNX Runtime session, the session that target
                                           is gated on
  client.py, run.py                        greedy generation over Triton's HTTP/REST protocol (tritonclient); run.py
                                           is the deploy bundle's numpy runner, whose Generator drives the cache
  manifest.json, verify_windows.npy        expected perplexity and greedy tokens (ONNX Runtime, default session)
  tokenizer.json, config.json, ...

The cache is the client's: every request carries `past.N.key/value` and returns `present.N.key/value` (the
graph's own inputs and outputs, so any Triton version serves it; no sequence batcher or implicit state). With
`max_batch_size` > 0 Triton owns dim 0, so dims below are the graph's without its batch dimension; the dynamic
batcher joins requests of equal shapes only, which for a KV-cache graph means decode steps of sequences at the
same position (and prefills of equal length). Triton's Prometheus metrics (port 8002) need no configuration.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import torch

from dscompress.artifact import owned_dir
from dscompress.errors import RecipeError
from dscompress.export import bundle_runner
from dscompress.export.bundle import VERIFY_TOKENS, expected_values
from dscompress.export.stage_export import export_stage
from dscompress.export.tensorrt import _sha256
from dscompress.version import __version__

ONNX_TO_TRITON = {
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.BFLOAT16: "TYPE_BF16",
}
KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}
VERIFY_WINDOWS, VERIFY_LEN = 2, 64


def model_name(stage: Path) -> str:
    """Triton model names become URL path segments: letters, digits, '-', '_' and '.'."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", stage.resolve().name).strip("-.")
    return name or "model"


def io_specs(model_path: Path) -> tuple[list[dict], list[dict]]:
    """(inputs, outputs) of the graph: name, Triton data type and dims below the batch dimension (-1 if dynamic).
    Refuses graphs whose dim 0 is fixed or whose types Triton's onnxruntime backend does not take."""

    def spec(value) -> dict:
        tensor = value.type.tensor_type
        if tensor.elem_type not in ONNX_TO_TRITON:
            raise RecipeError(f"triton: {value.name} has ONNX type {tensor.elem_type}, which this bundle does not map")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        if not dims or dims[0] != -1:
            raise RecipeError(f"triton: {value.name} has no dynamic batch dimension (dims {dims})")
        return {"name": value.name, "data_type": ONNX_TO_TRITON[tensor.elem_type], "dims": dims[1:]}

    graph = onnx.load(str(model_path), load_external_data=False).graph
    return [spec(v) for v in graph.input], [spec(v) for v in graph.output]


def config_pbtxt(name: str, inputs: list[dict], outputs: list[dict], max_batch: int, instances: int, kind: str,
                 queue_delay_us: int) -> str:  # fmt: skip
    """The model configuration in protobuf text format (Triton's model_config.proto)."""

    def block(kind_: str, specs: list[dict]) -> str:
        rows = [f'  {{ name: "{s["name"]}" data_type: {s["data_type"]} dims: [ {", ".join(map(str, s["dims"]))} ] }}'
                for s in specs]  # fmt: skip
        return f"{kind_} [\n" + ",\n".join(rows) + "\n]"

    return (
        f'name: "{name}"\nbackend: "onnxruntime"\nmax_batch_size: {max_batch}\n'
        f"{block('input', inputs)}\n{block('output', outputs)}\n"
        f"dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}\n"
        f"instance_group [ {{ count: {instances} kind: {KINDS[kind]} }} ]\n"
        'version_policy { latest { num_versions: 1 } }\n'
    )  # fmt: skip


def make_triton_repository(stage: Path, out: Path, windows: torch.Tensor, max_batch: int = 8, instances: int = 1,
                           kind: str = "cpu", queue_delay_us: int = 100) -> Path:  # fmt: skip
    """Write the repository, client and manifest for `stage` into `out` (atomically: nothing is left on failure)."""
    if windows.shape[1] < VERIFY_LEN or len(windows) < VERIFY_WINDOWS:
        raise RecipeError(f"the verification set needs {VERIFY_WINDOWS} windows of {VERIFY_LEN} tokens")
    if kind not in KINDS:
        raise RecipeError(f"triton: instance kind {kind!r}; allowed: {', '.join(KINDS)}")
    name = model_name(stage)
    with owned_dir(out, "bundle") as tmp:
        export = tmp / ".export"
        meta = export_stage(stage, "onnx-ort", export)
        version = tmp / "model_repository" / name / "1"
        version.mkdir(parents=True)
        for f in sorted(export.iterdir()):
            shutil.move(f, (version if f.name.startswith("model.onnx") else tmp) / f.name)
        export.rmdir()
        inputs, outputs = io_specs(version / "model.onnx")
        text = config_pbtxt(name, inputs, outputs, max_batch, instances, kind, queue_delay_us)
        (version.parent / "config.pbtxt").write_text(text)
        shutil.copy2(Path(bundle_runner.__file__), tmp / "run.py")
        shutil.copy2(Path(__file__).with_name("triton_client.py"), tmp / "client.py")
        rows = windows[:VERIFY_WINDOWS, :VERIFY_LEN].numpy().astype(np.int64)
        np.save(tmp / "verify_windows.npy", rows)
        manifest = {
            "dscompress": __version__,
            "stage": str(stage),
            "export": meta,
            "triton": {
                "model_name": name,
                "backend": "onnxruntime",
                "max_batch_size": max_batch,
                "instance_group": {"count": instances, "kind": KINDS[kind]},
                "dynamic_batching_queue_delay_us": queue_delay_us,
                "server_run_here": False,
            },  # fmt: skip
            "verify": {
                "windows_file": "verify_windows.npy",
                **expected_values(version / "model.onnx", rows, meta, exact_qdq=False),
                "max_perplexity_diff_pct": 0.1,
                "min_matching_tokens": VERIFY_TOKENS,  # the same graph in the same runtime: every token
            },  # fmt: skip
            "files": {str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out
