"""NVIDIA TensorRT-Edge-LLM's export step on a dscompress GPTQ checkpoint (the Jetson route of docs/DEPLOY.md).

Edge-LLM 0.11 (pip `tensorrt-edgellm`) pins its own stack (transformers 5.14.1, onnx 1.19, torch 2.13), so it runs
in a virtual environment of its own, created here on first use. Its export (checkpoint -> ONNX with its TensorRT
plugins) runs on a CPU; building and running the engine needs TensorRT and a GPU (Orin: JetPack 7.2), which this
script does not attempt.

    dscompress export out/run/1-gptq --format gptq --out /tmp/gptq      # symmetric, group 128
    python bench/edgellm_export.py --checkpoint /tmp/gptq --out /tmp/edgellm

Prints JSON: the operators of the exported graph, and how many Linears became Edge-LLM's INT4 group-wise GEMM
plugin (our grid, read from the packed checkpoint, not re-quantized).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

EDGELLM = "tensorrt-edgellm[export]==0.11.0"
# Edge-LLM copies the chat template from the tokenizer; a checkpoint without one (our tiny test models) gets this
# minimal Qwen-style template in the copy handed to it.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
INNER = """
import collections, json, sys
import onnx
from tensorrt_edgellm import AutoModel, export_onnx
src, out = sys.argv[1], sys.argv[2]
model = AutoModel.from_pretrained(src)
export_onnx(model, out + "/model.onnx", model_dir=src)
graph = onnx.load(out + "/model.onnx", load_external_data=False).graph
ops = collections.Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in graph.node)
print(json.dumps({"model_class": type(model).__name__, "operators": dict(ops),
                  "inputs": [i.name for i in graph.input]}))
"""


def ensure_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0", EDGELLM], check=True)
    return python


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", type=Path, required=True, help="`dscompress export --format gptq` output")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--venv", type=Path, default=Path.home() / ".cache" / "dscompress" / "edgellm-venv")
    args = ap.parse_args()
    python = ensure_venv(args.venv)
    src = args.out / "checkpoint"
    shutil.rmtree(args.out, ignore_errors=True)
    shutil.copytree(args.checkpoint, src)
    tok = json.loads((src / "tokenizer_config.json").read_text())
    if not tok.get("chat_template"):
        (src / "tokenizer_config.json").write_text(json.dumps(tok | {"chat_template": CHAT_TEMPLATE}, indent=2))
    (args.out / "onnx").mkdir()
    done = subprocess.run([str(python), "-c", INNER, str(src), str(args.out / "onnx")], capture_output=True, text=True)
    if done.returncode != 0:
        print(json.dumps({"error": done.stderr.strip().splitlines()[-1]}))
        sys.exit(1)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    config = json.loads((args.checkpoint / "config.json").read_text())["quantization_config"]
    result |= {"edgellm": EDGELLM, "grid": {k: config[k] for k in ("bits", "group_size", "sym")},
               "int4_plugin_linears": result["operators"].get("trt_edgellm::Int4GroupwiseGemmPluginV2", 0)}  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
