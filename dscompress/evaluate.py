"""`dscompress eval`: the pipeline's metrics for any model, outside a recipe."""

from __future__ import annotations

import tempfile
from functools import partial
from pathlib import Path

from rich.console import Console

from dscompress.calibrate.data import Corpus
from dscompress.calibrate.metrics import BaselineRef, compute_baseline, evaluate
from dscompress.calibrate.spec import DataSpec, SplitSpec
from dscompress.context import make_progress, tracked
from dscompress.models.adapters import adapter_for
from dscompress.models.load import load_model, load_tokenizer
from dscompress.models.sources import resolve
from dscompress.quant.actquant import attach_saved
from dscompress.runner import pick_device


def evaluate_models(
    model: str,
    baseline: str | None,
    source: str,
    samples: int,
    seq_len: int,
    batch_size: int,
    console: Console,
) -> dict:
    """Perplexity of `model` on the evaluation split; KL and top-1 against `baseline` when one is given.

    Both models must share a tokenizer; the windows come from `model`'s tokenizer.
    """
    device = pick_device("auto")
    target = resolve(model).directory
    spec = DataSpec(source=source, eval=SplitSpec(samples=samples, seq_len=seq_len), batch_size=batch_size)
    windows = Corpus(spec, load_tokenizer(target)).windows("eval")
    with make_progress(console) as progress, tempfile.TemporaryDirectory() as scratch:
        track = partial(tracked, progress)
        ref_dir = resolve(baseline).directory if baseline else target
        ref_model = load_model(ref_dir).to(device)
        adapter_for(ref_model.config)
        metrics = compute_baseline(ref_model, windows, batch_size, device, Path(scratch), track)
        if baseline:
            del ref_model
            candidate = load_model(target).to(device)
            attach_saved(candidate, target)  # W8A8 stages evaluate with their int8 activations
            adapter_for(candidate.config)
            ref = BaselineRef(Path(scratch))
            metrics = evaluate(candidate, windows, ref, batch_size, device, track) | {
                "baseline_perplexity": metrics["perplexity"]
            }
            del ref
    return {"model": model, "baseline": baseline, "windows": samples, "seq_len": seq_len, **metrics}
