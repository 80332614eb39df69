"""`dscompress bundle STAGE --target triton`: the model repository's config.pbtxt parsed by Triton's own protobuf
definitions (tritonclient's model_config.proto) and checked against the ONNX graph; the bundle's client driven
through tritonclient's real HTTP request path against a stand-in for Triton's KServe v2 `infer` endpoint that runs
the repository's model in ONNX Runtime. No Triton server runs here (none is installable offline); the stand-in
implements only what the client calls: POST /v2/models/<name>/infer with binary tensors."""

import importlib.util
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import cli_here
from google.protobuf import text_format

from dscompress.export.bundle_runner import Generator, OrtBackend
from dscompress.models.sources import resolve

TYPES = {"INT64": np.int64, "FP32": np.float32, "FP16": np.float16}


def model_config_proto():
    """Triton's ModelConfig message class, loaded from tritonclient's generated module by path (importing
    tritonclient.grpc would also need grpcio, which the HTTP client does not)."""
    root = Path(importlib.util.find_spec("tritonclient").submodule_search_locations[0])
    spec = importlib.util.spec_from_file_location("model_config_pb2", root / "grpc" / "model_config_pb2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class StandIn(BaseHTTPRequestHandler):
    """KServe v2 binary-tensor `infer`, run by ONNX Runtime's default session (what Triton's onnxruntime backend
    creates). `server.sessions` maps model name -> session; `server.requests` counts calls."""

    def do_POST(self):  # noqa: N802 (http.server's naming)
        name = self.path.split("/")[3]
        body = self.rfile.read(int(self.headers["Content-Length"]))
        header_len = int(self.headers.get("Inference-Header-Content-Length", len(body)))
        request, offset, feeds = json.loads(body[:header_len]), header_len, {}
        for tensor in request["inputs"]:
            size = tensor["parameters"]["binary_data_size"]
            data = np.frombuffer(body[offset : offset + size], TYPES[tensor["datatype"]])
            feeds[tensor["name"]] = data.reshape(tensor["shape"])
            offset += size
        session = self.server.sessions[name]
        wanted = [o["name"] for o in request["outputs"]]
        results = session.run(wanted, feeds)
        self.server.requests += 1
        outputs, blobs = [], []
        for key, value in zip(wanted, results, strict=True):
            kind = {v: k for k, v in TYPES.items()}[value.dtype.type]
            outputs.append({"name": key, "datatype": kind, "shape": list(value.shape),
                            "parameters": {"binary_data_size": value.nbytes}})  # fmt: skip
            blobs.append(np.ascontiguousarray(value).tobytes())
        header = json.dumps({"model_name": name, "outputs": outputs}).encode()
        payload = header + b"".join(blobs)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Inference-Header-Content-Length", str(len(header)))
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def stand_in():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    server.sessions, server.requests = {}, 0
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("arch", ["qwen2", "deepseek_v3"])  # llama, qwen3, qwen3_moe: passed once by hand
def test_triton_repository_config_parses_and_the_client_generates_through_the_request_path(tmp_path, stand_in, arch):
    stage, out = resolve(f"tiny:{arch}").directory, tmp_path / "triton"
    done = cli_here("bundle", str(stage), "--target", "triton", "--out", str(out), "--max-batch", "4",
                    "--instances", "2")  # fmt: skip
    assert done.returncode == 0, done.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    name = manifest["triton"]["model_name"]
    model = out / "model_repository" / name / "1" / "model.onnx"
    config = text_format.Parse((model.parent.parent / "config.pbtxt").read_text(), model_config_proto().ModelConfig())
    assert (config.name, config.backend, config.max_batch_size) == (name, "onnxruntime", 4)
    assert config.HasField("dynamic_batching") and config.instance_group[0].count == 2
    assert config.instance_group[0].kind == model_config_proto().ModelInstanceGroup.KIND_CPU
    graph = onnx.load(str(model), load_external_data=False).graph
    assert [i.name for i in config.input] == [i.name for i in graph.input] == manifest["export"]["inputs"]
    assert [o.name for o in config.output] == [o.name for o in graph.output] == manifest["export"]["outputs"]
    for declared, value in zip(list(config.input) + list(config.output), list(graph.input) + list(graph.output),
                               strict=True):  # fmt: skip
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
        assert list(declared.dims) == dims[1:]  # Triton owns the batch dimension
    layout = manifest["export"]["layout"]
    assert list(config.input[3].dims) == [layout["key"][0], -1, layout["key"][1]]  # the KV cache is declared

    stand_in.sessions[name] = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    url = f"127.0.0.1:{stand_in.server_address[1]}"
    done = subprocess.run([sys.executable, str(out / "client.py"), "--url", url, "--verify"], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0 and done.stdout.startswith("PASS"), done.stdout + done.stderr
    done = subprocess.run([sys.executable, str(out / "client.py"), "--url", url, "--new-tokens", "12"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    tokens = json.loads(done.stdout)["tokens"]
    direct = Generator(OrtBackend(model, manifest["export"], exact_qdq=False), manifest["export"])
    assert tokens == direct.greedy(manifest["verify"]["prompt_ids"], 12)[0]
    assert tokens[: len(manifest["verify"]["expected_tokens"])] == manifest["verify"]["expected_tokens"][:12]
    assert stand_in.requests > 12  # one request per prefill and per decode step


def test_triton_client_says_in_one_line_that_no_server_answers(tmp_path):
    out = tmp_path / "triton"
    stage = resolve("tiny:llama").directory
    assert cli_here("bundle", str(stage), "--target", "triton", "--out", str(out)).returncode == 0
    done = subprocess.run([sys.executable, str(out / "client.py"), "--url", "127.0.0.1:9", "--verify"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and done.stderr.startswith("FAIL: 127.0.0.1:9") and "Traceback" not in done.stderr


def test_triton_refuses_a_bad_instance_kind_before_any_work(tmp_path):
    out = tmp_path / "triton"
    done = cli_here("bundle", str(resolve("tiny:llama").directory), "--target", "triton", "--out", str(out),
                    "--instance-kind", "tpu")  # fmt: skip
    assert done.returncode != 0 and "--instance-kind" in done.stderr and "cpu, gpu" in done.stderr
    assert not out.exists()
