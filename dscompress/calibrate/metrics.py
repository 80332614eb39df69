"""Accuracy on held-out windows: perplexity, KL to the uncompressed baseline, and top-1 agreement with it.

Memory stays bounded: logits exist for one batch at a time. The baseline's full next-token log-probabilities
are streamed once to `baseline_logprobs.safetensors` in the baseline stage and read back one batch of rows at a
time, so KL(P_base || Q_stage) is computed over the whole vocabulary. They are stored as float16 after
subtracting each position's maximum (log-softmax restores it on reading), so the tokens that carry the
probability mass sit near 0 where float16 is finest; tests compare the result with float64 KL. The baseline's
own top-1 token comes from float32 logits and is stored beside it.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from dscompress.artifact import BASELINE_FILE
from dscompress.errors import DataError


class StreamingSafetensors:
    """Write a safetensors file tensor by tensor, batch by batch, without holding any tensor whole.

    The layout (names, dtypes, shapes) is declared up front; rows are then appended in declaration order.
    """

    DTYPES = {torch.float16: ("F16", 2), torch.float32: ("F32", 4), torch.int32: ("I32", 4)}

    def __init__(self, path: Path, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]]):
        header, offset = {}, 0
        for name, (dtype, shape) in layout.items():
            code, size = self.DTYPES[dtype]
            nbytes = math.prod(shape) * size
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % 8)  # align the data to 8 bytes, as the format recommends
        self.fh = open(path, "wb")  # noqa: SIM115 (closed in close(); rows arrive over many calls)
        self.fh.write(struct.pack("<Q", len(raw)) + raw)
        self.expected = 8 + len(raw) + offset

    def write(self, rows: torch.Tensor) -> None:
        self.fh.write(rows.contiguous().numpy().tobytes())

    def close(self) -> None:
        written = self.fh.tell()
        self.fh.close()
        assert written == self.expected, f"wrote {written} bytes, layout needs {self.expected}"

    def abort(self) -> None:
        """Close and delete a file left incomplete by an exception (Ctrl-C, a full disk), so that the exception
        itself, not a size check, is what the user sees."""
        self.fh.close()
        Path(self.fh.name).unlink(missing_ok=True)


class BaselineRef:
    """Read access to a stored baseline: log-probs and top-1 ids by window rows."""

    def __init__(self, directory: Path):
        self.handle = safe_open(str(directory / BASELINE_FILE), framework="pt")

    def logp(self, rows: slice) -> torch.Tensor:  # (B, T-1, V) float32
        shifted = self.handle.get_slice("logp_shifted")[rows.start : rows.stop].float()
        # Renormalizing leaves float16 round-off only at second order in KL (first order cancels when P sums to 1).
        return torch.log_softmax(shifted, dim=-1)

    def top1(self, rows: slice) -> torch.Tensor:  # (B, T-1) int64
        return self.handle.get_slice("top1")[rows.start : rows.stop].long()


def batched_logprobs(
    model: torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int,
    device: torch.device,
    track: Callable[[range, str], Iterator[int]] | None = None,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield (window slice, next-token log-probs (B, T-1, V) float32 on CPU), one batch at a time."""
    starts = range(0, len(windows), batch_size)
    for start in track(starts, "evaluate") if track else starts:
        rows = slice(start, min(start + batch_size, len(windows)))
        with torch.no_grad():
            logits = model(windows[rows].to(device)).logits[:, :-1].float()
        yield rows, torch.log_softmax(logits, dim=-1).cpu()


def kl_full(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Per-position KL(P || Q) over the last (vocabulary) dim; float32 terms, float64 sums. (..., V) -> (...)"""
    return (logp.exp() * (logp - logq)).sum(-1, dtype=torch.float64).clamp_min(0.0)


def _nll_sum(logp: torch.Tensor, labels: torch.Tensor) -> float:
    return float(-logp.gather(-1, labels.unsqueeze(-1)).double().sum())


def compute_baseline(model, windows, batch_size: int, device, directory: Path, track=None) -> dict:
    """Stream the baseline's log-probs into `directory` and return its own metrics (KL 0, top-1 1)."""
    n, t = windows.shape
    vocab = model.config.get_text_config().vocab_size
    layout = {
        "logp_shifted": (torch.float16, (n, t - 1, vocab)),
        "top1": (torch.int32, (n, t - 1)),
    }
    writer = StreamingSafetensors(directory / BASELINE_FILE, layout)
    nll, top1 = 0.0, []
    try:
        for rows, logp in batched_logprobs(model, windows, batch_size, device, track):
            assert logp.shape[-1] == vocab, f"logits have {logp.shape[-1]} entries, config says {vocab}"
            peak, argmax = logp.max(-1)
            writer.write((logp - peak.unsqueeze(-1)).half())
            top1.append(argmax.to(torch.int32))
            nll += _nll_sum(logp, windows[rows, 1:])
        writer.write(torch.cat(top1))
    except BaseException:
        writer.abort()
        raise
    writer.close()
    count = n * (t - 1)
    if not math.isfinite(nll):
        raise DataError(
            f"the unquantized model's perplexity on the evaluation split is {nll / count} (not finite): its "
            "weights or activations overflow. Fix: check the checkpoint for NaN/Inf weights, or evaluate in float32"
        )
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "kl": 0.0, "top1": 1.0, "tokens": count}


def evaluate(model, windows, ref: BaselineRef, batch_size: int, device, track=None) -> dict:
    """Perplexity, mean KL to the baseline (nats/token) and top-1 agreement on the same windows."""
    nll = kl = 0.0
    agree = 0
    for rows, logp in batched_logprobs(model, windows, batch_size, device, track):
        nll += _nll_sum(logp, windows[rows, 1:])
        ref_logp = ref.logp(rows)
        kl += sum(float(kl_full(ref_logp[i], logp[i]).sum()) for i in range(len(logp)))  # a window at a time
        agree += int((logp.argmax(-1) == ref.top1(rows)).sum())
    count = windows.shape[0] * (windows.shape[1] - 1)
    return {
        "perplexity": math.exp(nll / count),
        "nll": nll / count,
        "kl": kl / count,
        "top1": agree / count,
        "tokens": count,
    }
