"""Shared by the peer workers: read the job, time the work, report peak RSS. Runs inside each peer's venv, so it
imports nothing from dscompress."""

import json
import resource
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file


def job() -> dict:
    spec = json.loads(Path(sys.argv[1]).read_text())
    spec["calibration"] = load_file(spec["windows"])["calibration"]
    spec["eval"] = load_file(spec["windows"])["eval"]
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
