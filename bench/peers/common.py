"""Shared by the peer workers: read the job, time the work, report peak RSS. Runs inside each peer's venv, so it
imports nothing from dscompress."""

import json
import math
import resource
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file


def job() -> dict:
    spec = json.loads(Path(sys.argv[1]).read_text())
    spec |= load_file(spec["windows"])  # "eval", and "calibration" or "train" as the bench wrote them
    return spec


def peak_rss_gib() -> float:
    """VmHWM of this process. (getrusage's ru_maxrss survives exec on Linux, so it can report the parent's.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def finish(spec: dict, **fields) -> None:
    fields["peak_rss_gib"] = peak_rss_gib()
    Path(spec["result"]).write_text(json.dumps(fields, indent=2) + "\n")


def perplexity(model, windows: torch.Tensor) -> float:
    """exp(mean next-token NLL) over the windows, computed inside the peer's own runtime."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for row in windows:
            logits = model(row.unsqueeze(0)).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum"))
            count += row.numel() - 1
    return float(torch.exp(torch.tensor(nll / count)))


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def score(model_logits, spec: dict) -> dict:
    """Perplexity, KL to the fp32 baseline and top-1 agreement on the evaluation windows, one window at a time.

    `model_logits(ids (1, T)) -> logits (1, T, V)`. The baseline's log-probs come from the bench's
    baseline_logprobs.safetensors (float16 shifted log-probs, renormalized here as dscompress does).
    """
    from safetensors import safe_open

    base = safe_open(spec["baseline"], framework="pt")
    nll = kl = 0.0
    agree = count = 0
    with torch.no_grad():
        for i, row in enumerate(spec["eval"]):
            logp = torch.log_softmax(model_logits(row.unsqueeze(0))[0, :-1].float(), -1)
            ref = torch.log_softmax(base.get_slice("logp_shifted")[i : i + 1].float()[0], -1)
            nll += float(-logp.gather(-1, row[1:].unsqueeze(-1)).double().sum())
            kl += float((ref.exp() * (ref - logp)).sum(-1, dtype=torch.float64).clamp_min(0).sum())
            agree += int((logp.argmax(-1) == base.get_slice("top1")[i : i + 1][0].long()).sum())
            count += row.numel() - 1
    return {"perplexity": math.exp(nll / count), "kl": kl / count, "top1": agree / count}
