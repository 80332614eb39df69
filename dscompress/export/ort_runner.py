"""ONNX Runtime sessions over an exported model: full-window logits, and greedy generation with the KV cache.

Used by the parity gate, `dscompress generate` and `dscompress bench`, so all three run the same loop.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

MODEL_FILE = "model.onnx"


class OrtLM:
    """The exported graph in an ONNX Runtime session, driven by the bundle runner's KV-cache loop."""

    def __init__(self, directory: Path, threads: int = 0, exact_qdq: bool = True):
        from dscompress.export import bundle_runner

        self.directory = Path(directory)
        self.meta = json.loads((self.directory / "export.json").read_text())
        backend = bundle_runner.OrtBackend(self.directory / MODEL_FILE, self.meta, threads, exact_qdq)
        self.gen = bundle_runner.Generator(backend, self.meta)
        self.empty_past, self.step = self.gen.empty_past, self.gen.step

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Whole-window logits (prefill with an empty cache), as torch (B, T, V)."""
        out, _ = self.step(ids.numpy(), self.empty_past(ids.shape[0]), 0)
        return torch.from_numpy(out)

    def __call__(self, ids: torch.Tensor):  # the `model(ids).logits` protocol of calibrate.metrics
        return _Logits(self.logits(ids.cpu()))

    def greedy(self, prompt: torch.Tensor, new_tokens: int) -> tuple[list[int], dict]:
        """Greedy continuation of one prompt (1-D ids) with the KV cache; returns (tokens, timings)."""
        tokens, prefill_s, decode_ms = self.gen.greedy(prompt.tolist(), new_tokens)
        return tokens, {"prefill_s": prefill_s, "decode_ms_per_token": decode_ms}


class _Logits:
    def __init__(self, logits: torch.Tensor):
        self.logits = logits


def torch_greedy(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            prompt.unsqueeze(0),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()
