"""`dscompress bench` and `dscompress generate`: prefill and decode latency, tokens/s and peak memory, for a torch
stage directory or an exported ONNX directory, with the same greedy KV-cache loop.

Each model is measured in its own process (`python -m dscompress.export.benchmark PATH ...`), so peak memory
(VmHWM) belongs to that model alone. Latencies are medians over `repeats` runs after one warm-up.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from dscompress.errors import ModelSourceError, RecipeError


def is_onnx_dir(path: Path) -> bool:
    return (path / "export.json").is_file() and (path / "model.onnx").is_file()


def _peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class TorchLM:
    """The torch artifact behind the same greedy interface as OrtLM (for side-by-side numbers)."""

    def __init__(self, directory: Path):
        from dscompress.models.load import load_model
        from dscompress.quant.actquant import attach_saved

        self.model = load_model(directory).eval()
        attach_saved(self.model, directory)

    @torch.no_grad()
    def greedy(self, prompt: torch.Tensor, new_tokens: int) -> tuple[list[int], dict]:
        started = time.perf_counter()
        out = self.model(prompt[None], use_cache=True)
        prefill_s = time.perf_counter() - started
        tokens, cache = [int(out.logits[0, -1].argmax())], out.past_key_values
        decode_started = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = self.model(torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            tokens.append(int(out.logits[0, -1].argmax()))
        per_token = (time.perf_counter() - decode_started) / max(new_tokens - 1, 1)
        return tokens, {"prefill_s": prefill_s, "decode_ms_per_token": per_token * 1000}


class EngineLM:
    """A bundle's TensorRT engine (model.engine) behind the same greedy interface, via the bundle's runner."""

    def __init__(self, directory: Path):
        from dscompress.export import bundle_runner
        from dscompress.export.tensorrt import require_tensorrt

        require_tensorrt()
        meta = json.loads((directory / "export.json").read_text())
        self.gen = bundle_runner.Generator(bundle_runner.TrtBackend(directory / "model.engine", meta), meta)

    def greedy(self, prompt: torch.Tensor, new_tokens: int) -> tuple[list[int], dict]:
        tokens, prefill_s, ms = self.gen.greedy(prompt.tolist(), new_tokens)
        return tokens, {"prefill_s": prefill_s, "decode_ms_per_token": ms}


def model_dir(path: Path | str) -> Path:
    """A model argument of generate / bench: an ONNX export, a bundle or a checkpoint directory (checked:
    config.json, complete safetensors), or `bundled:<name>` / `tiny:<arch>`. Never passed on as a hub id."""
    from dscompress.models.sources import check_checkpoint_dir, resolve

    text = str(path)
    if text.startswith(("bundled:", "tiny:")):
        return resolve(text).directory
    path = Path(path)
    if is_onnx_dir(path) or ((path / "model.engine").is_file() and (path / "export.json").is_file()):
        return path
    if path.is_dir() and (path / "config.json").is_file():
        return check_checkpoint_dir(path)
    raise ModelSourceError(
        f"{path}: neither an exported ONNX directory (export.json) nor a checkpoint directory. Fix: give a stage "
        "folder (out/<run>/latest), an export folder, bundled:<name> or tiny:<arch>"
    )


def open_lm(path: Path, exact_qdq: bool = True):
    """`exact_qdq=False` lets ONNX Runtime fuse Q/DQ into its int8 kernels: what latency runs measure."""
    from dscompress.export.ort_runner import OrtLM

    path = model_dir(path)
    if (path / "model.engine").is_file() and (path / "export.json").is_file():
        return EngineLM(path)
    if is_onnx_dir(path):
        return OrtLM(path, exact_qdq=exact_qdq)
    return TorchLM(path)


def tokenizer_for(path: Path):
    from dscompress.models.load import load_tokenizer

    return load_tokenizer(path)


def measure(path: Path, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    lm = open_lm(path, exact_qdq=False)
    prompt = torch.arange(prompt_len) % 1000 + 100  # fixed ids: latency does not depend on the text
    lm.greedy(prompt, 2)  # warm-up
    runs = [lm.greedy(prompt, new_tokens)[1] for _ in range(repeats)]
    decode = statistics.median(r["decode_ms_per_token"] for r in runs)
    files = [p for p in path.iterdir() if p.is_file() and p.name.startswith("model")]
    return {
        "model": str(path),
        "runtime": type(lm).__name__.replace("LM", "").lower(),
        "prefill_s": statistics.median(r["prefill_s"] for r in runs),
        "decode_ms_per_token": decode,
        "decode_tokens_per_s": 1000.0 / decode,
        "peak_rss_bytes": _peak_rss_bytes(),
        "model_bytes": sum(p.stat().st_size for p in files),
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "repeats": repeats,
    }


def bench(paths: list[Path], prompt_len: int, new_tokens: int, repeats: int) -> list[dict]:
    """Measure each model in a fresh process."""
    results = []
    paths = [model_dir(p) for p in paths]  # every argument checked before the first measurement
    for path in paths:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "dscompress.export.benchmark",
                str(path),
                str(prompt_len),
                str(new_tokens),
                str(repeats),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        try:
            last = json.loads((proc.stdout.strip().splitlines() or ["{}"])[-1])
        except json.JSONDecodeError:
            last = {}
        if "refused" in last:  # a known failure in the measuring process (NaN weights, a missing tensor, ...)
            raise ModelSourceError(last["refused"])
        if proc.returncode != 0:
            raise RuntimeError(f"{path}: {(proc.stderr.strip().splitlines() or ['failed'])[-1]}")
        results.append(last)
    return results


def generate(path: Path, prompt: str, new_tokens: int) -> dict:
    if not prompt.strip():
        raise RecipeError("--prompt: empty or only whitespace; there is nothing to continue. Fix: give some text")
    path = model_dir(path)
    lm = open_lm(path)
    tok = tokenizer_for(path)
    ids = torch.tensor(tok(prompt)["input_ids"])
    tokens, timings = lm.greedy(ids, new_tokens)
    return {"text": tok.decode(tokens, skip_special_tokens=True), "tokens": tokens, **timings}


if __name__ == "__main__":
    from dscompress.errors import DscompressError

    target, plen, ntok, reps = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    try:
        print(json.dumps(measure(target, plen, ntok, reps)))
    except DscompressError as exc:  # handed to the parent, which reports it as its own one-line error
        print(json.dumps({"refused": str(exc)}))
        sys.exit(2)
