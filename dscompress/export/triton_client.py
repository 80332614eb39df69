"""Greedy generation against a Triton Inference Server serving a dscompress Triton bundle (HTTP/REST, KServe v2
protocol with binary tensors, through the official `tritonclient[http]`). Copied into every Triton bundle as
`client.py`, next to `run.py` (the bundle runner, whose Generator keeps the KV cache on the client's side).

    tritonserver --model-repository=$PWD/model_repository              # on the serving host
    python3 client.py --url localhost:8000 --verify                   # parity against manifest.json: PASS / FAIL
    python3 client.py --url localhost:8000 --prompt-ids 1,2,3 --new-tokens 32

Each step sends input_ids, attention_mask, position_ids and past.N.key/value, and reads logits and
present.N.key/value back: the graph's own inputs and outputs, declared in config.pbtxt.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

try:  # inside a bundle: run.py beside this file
    from run import Generator, answer, parse_with_manifest
except ImportError:  # inside dscompress
    from dscompress.export.bundle_runner import Generator, answer, parse_with_manifest


class TritonBackend:
    """One Triton model over HTTP: run(feeds) -> outputs in the export's order, like the bundle's other backends."""

    def __init__(self, url: str, model: str, layout: dict, client=None):
        import tritonclient.http as http

        self.http, self.model, self.layout = http, model, layout
        self.client = client or http.InferenceServerClient(url)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        from tritonclient.utils import np_to_triton_dtype

        inputs = []
        for name, array in feeds.items():
            array = np.ascontiguousarray(array)
            tensor = self.http.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array, binary_data=True)
            inputs.append(tensor)
        wanted = [self.http.InferRequestedOutput(name, binary_data=True) for name in self.layout["outputs"]]
        result = self.client.infer(self.model, inputs, outputs=wanted)
        return [result.as_numpy(name) for name in self.layout["outputs"]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="localhost:8000", help="Triton's HTTP endpoint, host:port")
    ap.add_argument("--model", default=None, help="model name (default: the bundle's)")
    args, manifest = parse_with_manifest(ap, argv)
    meta = manifest["export"]
    try:
        backend = TritonBackend(args.url, args.model or manifest["triton"]["model_name"], meta)
        return answer(Generator(backend, meta), manifest, args)
    except ImportError:
        print("FAIL: the client needs tritonclient: pip install 'tritonclient[http]'", file=sys.stderr)
        return 2
    except Exception as exc:  # a server that is down or refuses the request: one line, not a traceback
        print(f"FAIL: {args.url}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
