"""Deploy-bundle runner: greedy generation and the on-device parity check, with only numpy plus TensorRT (as JetPack
ships it) or ONNX Runtime. This file is copied verbatim into every bundle as `run.py`; dscompress also imports it,
so `dscompress generate` / `bench` drive a TensorRT engine through the same class.

    python3 run.py --engine model.engine --verify          # on the device, after build_engine.sh
    python3 run.py --backend ort --onnx model.onnx --verify  # the same check through ONNX Runtime (a stand-in)
    python3 run.py --engine model.engine --prompt-ids 1,2,3 --new-tokens 32

Both backends take the exported graph's inputs (input_ids, attention_mask, position_ids, past.{i}.key/value) and
return (logits, present). The TensorRT backend allocates device buffers through cuda-python's runtime API
(`cuda.bindings.runtime` or the older `cuda.cudart`) and runs `execute_async_v3` once per step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


class OrtBackend:
    """`exact_qdq` (default) keeps ONNX Runtime from fusing Q/DQ pairs into its own int8 kernels, so the session
    computes what the graph says (and what TensorRT's exact int32 accumulation gives). On x86 CPUs without VNNI
    those kernels multiply u8 x s8 with VPMADDUBSW, whose 16-bit pair sums saturate: measured on SmolLM2 W8A8
    (AMD EPYC, AVX2 only), perplexity 13.765 fused vs 13.712 exact vs 13.685 in PyTorch. Latency runs fuse."""

    def __init__(self, onnx_path: Path, layout: dict, threads: int = 0, exact_qdq: bool = True):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if exact_qdq:
            options.add_session_config_entry("session.disable_quant_qdq", "1")
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.layout = layout

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, feeds)


class TrtBackend:
    """One TensorRT execution context; shapes are set per call, outputs are sized from the context."""

    def __init__(self, engine_path: Path, layout: dict):
        import tensorrt as trt

        self.trt, self.layout = trt, layout
        self.cudart = _cudart()
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{engine_path}: TensorRT could not deserialize it (built for another TensorRT/GPU?)")
        self.context = self.engine.create_execution_context()
        self.stream = _check(self.cudart.cudaStreamCreate())
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        trt, cudart = self.trt, self.cudart
        buffers = []
        try:
            for name in self.names:
                if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                    host = np.ascontiguousarray(feeds[name])
                    self.context.set_input_shape(name, host.shape)
                    buffers.append(self._device_copy(name, host))
            outputs = {}
            for name in self.names:
                if self.engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                    shape = tuple(self.context.get_tensor_shape(name))
                    dtype = trt.nptype(self.engine.get_tensor_dtype(name))
                    outputs[name] = np.empty(shape, dtype)
                    pointer = _check(cudart.cudaMallocAsync(max(outputs[name].nbytes, 1), self.stream))
                    buffers.append(pointer)
                    self.context.set_tensor_address(name, pointer)
            if not self.context.execute_async_v3(self.stream):
                raise RuntimeError("execute_async_v3 failed")
            for name, host in outputs.items():
                kind = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
                _check(
                    cudart.cudaMemcpyAsync(
                        host.ctypes.data, self.context.get_tensor_address(name), host.nbytes, kind, self.stream
                    )
                )
            _check(cudart.cudaStreamSynchronize(self.stream))
            return [outputs[name] for name in self.layout["outputs"]]
        finally:
            for pointer in buffers:
                cudart.cudaFreeAsync(pointer, self.stream)

    def _device_copy(self, name: str, host: np.ndarray) -> int:
        cudart = self.cudart
        pointer = _check(cudart.cudaMallocAsync(max(host.nbytes, 1), self.stream))
        kind = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        _check(cudart.cudaMemcpyAsync(pointer, host.ctypes.data, host.nbytes, kind, self.stream))
        self.context.set_tensor_address(name, pointer)
        return pointer


def _cudart():
    try:
        from cuda.bindings import runtime
    except ImportError:
        from cuda import cudart as runtime
    return runtime


def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA runtime error {err}")
    return rest[0] if len(rest) == 1 else rest


class Generator:
    """Greedy decoding with the KV cache over any backend that runs the exported graph."""

    def __init__(self, backend, meta: dict):
        self.backend, self.meta = backend, meta
        layout = meta["layout"]
        self.layers, self.key, self.value = layout["layers"], layout["key"], layout["value"]
        self.dtype = np.float16 if meta.get("fp16") else np.float32
        template = meta.get("past_name", "past.%d.%s")  # ort-genai exports: past_key_values.%d.%s
        self.past_names = [template % (i, kv) for i in range(self.layers) for kv in ("key", "value")]
        # the graph's inputs: ORT GenAI's builder graphs take no position_ids (GroupQueryAttention derives them)
        self.inputs = set(meta.get("inputs") or ["input_ids", "attention_mask", "position_ids", *self.past_names])
        # which cache each present.{i}.{kv} output feeds next step, in the graph's output order (the builder's
        # graphs list every key before any value)
        presents = (meta.get("outputs") or ["logits", *(n.replace("past", "present", 1) for n in self.past_names)])[1:]
        self.feeds_back = [template % (int(n.split(".")[-2]), n.split(".")[-1]) for n in presents]

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        shapes = [(batch, self.key[0], 0, self.key[1]), (batch, self.value[0], 0, self.value[1])]
        return {name: np.zeros(shapes[j % 2], self.dtype) for j, name in enumerate(self.past_names)}

    def step(self, ids: np.ndarray, past: dict, start: int) -> tuple[np.ndarray, dict]:
        batch, seq = ids.shape
        feeds = {
            "input_ids": ids.astype(np.int64),
            "attention_mask": np.ones((batch, start + seq), np.int64),
            "position_ids": np.broadcast_to(np.arange(start, start + seq, dtype=np.int64), (batch, seq)).copy(),
            **past,
        }
        feeds = {name: value for name, value in feeds.items() if name in self.inputs}
        out = self.backend.run(feeds)  # outputs: logits, then present.{i}.key/value (feeds_back's order)
        return out[0].astype(np.float32), dict(zip(self.feeds_back, out[1:], strict=True))

    def greedy(self, prompt: list[int], new_tokens: int) -> tuple[list[int], float, float]:
        """(tokens, prefill seconds, decode milliseconds per token)."""
        started = time.perf_counter()
        logits, past = self.step(np.array([prompt]), self.empty_past(1), 0)
        prefill_s = time.perf_counter() - started
        tokens, position, started = [int(logits[0, -1].argmax())], len(prompt), time.perf_counter()
        for _ in range(new_tokens - 1):
            logits, past = self.step(np.array([[tokens[-1]]]), past, position)
            position += 1
            tokens.append(int(logits[0, -1].argmax()))
        return tokens, prefill_s, (time.perf_counter() - started) / max(new_tokens - 1, 1) * 1000


def perplexity(gen: Generator, windows: np.ndarray) -> float:
    nll, count = 0.0, 0
    for row in windows:
        logits, _ = gen.step(row[None], gen.empty_past(1), 0)
        z = logits[0, :-1].astype(np.float64)
        logp = z - z.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(len(row) - 1), row[1:]].sum())
        count += len(row) - 1
    return float(np.exp(nll / count))


def verify(gen: Generator, manifest: dict) -> tuple[bool, str]:
    """Perplexity on the bundled windows and greedy tokens on the bundled prompt, against the manifest."""
    check = manifest["verify"]
    windows = np.load(HERE / check["windows_file"])
    ppl = perplexity(gen, windows)
    drift = abs(ppl / check["expected_perplexity"] - 1.0) * 100.0
    tokens, _, ms = gen.greedy(check["prompt_ids"], len(check["expected_tokens"]))
    same = sum(a == b for a, b in zip(tokens, check["expected_tokens"], strict=False))
    ok = drift <= check["max_perplexity_diff_pct"] and same >= check["min_matching_tokens"]
    return ok, (
        f"perplexity {ppl:.4f} vs expected {check['expected_perplexity']:.4f} ({drift:.3f}%, max "
        f"{check['max_perplexity_diff_pct']}%); greedy tokens matching {same}/{len(tokens)} "
        f"(min {check['min_matching_tokens']}); decode {ms:.2f} ms/token"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=["tensorrt", "ort"], default="tensorrt")
    ap.add_argument("--engine", type=Path, default=HERE / "model.engine")
    ap.add_argument("--onnx", type=Path, default=HERE / "model.onnx")
    args, manifest = parse_with_manifest(ap, argv)
    meta = manifest["export"]
    if args.backend == "ort":
        backend = OrtBackend(args.onnx, meta)
    else:
        if not args.engine.exists():
            print(f"FAIL: {args.engine} is missing; run ./build_engine.sh first", file=sys.stderr)
            return 2
        backend = TrtBackend(args.engine, meta)
    return answer(Generator(backend, meta), manifest, args)


def parse_with_manifest(ap: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, dict]:
    """The options every bundle program shares (--verify, --prompt-ids, --new-tokens), parsed; and manifest.json."""
    ap.add_argument("--verify", action="store_true", help="parity check against manifest.json; exit 0 on pass")
    ap.add_argument("--prompt-ids", default="", help="comma-separated token ids (default: the bundled prompt)")
    ap.add_argument("--new-tokens", type=int, default=32)
    return ap.parse_args(argv), json.loads((HERE / "manifest.json").read_text())


def answer(gen: Generator, manifest: dict, args) -> int:
    """`--verify`: PASS/FAIL against the manifest (exit 0 on pass); else the greedy tokens of --prompt-ids (or the
    bundled prompt) as JSON. Shared by run.py and the Triton bundle's client.py."""
    if args.verify:
        ok, detail = verify(gen, manifest)
        print(("PASS: " if ok else "FAIL: ") + detail)
        return 0 if ok else 1
    prompt = [int(t) for t in args.prompt_ids.split(",")] if args.prompt_ids else manifest["verify"]["prompt_ids"]
    tokens, prefill_s, ms = gen.greedy(prompt, args.new_tokens)
    print(json.dumps({"tokens": tokens, "prefill_s": prefill_s, "decode_ms_per_token": ms}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
