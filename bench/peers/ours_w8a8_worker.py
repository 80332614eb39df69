"""dscompress worker for bench_w8a8.py: the int8 pass (or its calibration alone) on the bench's windows."""

import time
from pathlib import Path

import torch
from common import Timer, finish, job, score
from rich.console import Console

from dscompress.compress.int8.apply import apply, calibrate, site_readers
from dscompress.compress.int8.config import Int8Config
from dscompress.compress.int8.smoothquant import layer_sites
from dscompress.context import StageContext, make_progress
from dscompress.gates import Gate
from dscompress.models.adapters import adapter_for
from dscompress.models.load import load_model

spec = job()
console = Console(stderr=True)
device = torch.device(spec.get("device", "cpu"))
config = Int8Config(**spec["config"])
gate = Gate(perplexity={"max_increase_pct": spec.get("gate_ppl_pct", 2.0)})
model = load_model(Path(spec["model"]))
touched = sum(float(p.float().sum()) for p in model.parameters())  # fault every weight page in: the model's RSS
model_gib = int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) / 2**20
with Timer() as t, make_progress(console) as progress:
    ctx = StageContext(adapter_for(model.config), device, 0, console, progress, lambda: spec["calibration"], gate=gate)
    if spec["mode"] == "calibrate":  # observers + smoothing + threshold search only: what ORT's calibrator does
        sites = {i: layer_sites(ctx.adapter, model, i) for i in range(len(ctx.adapter.layers(model)))}
        observers, _ = calibrate(model, ctx, config, lambda i: [s for s in sites[i] if site_readers(s, config)])
        thresholds = {name: obs.threshold(config.calibration, config.percentile) for name, obs in observers.items()}
        if device.type == "cuda":
            torch.cuda.synchronize()
        result = None
    else:
        result = apply(model, config, ctx)
fields = {"seconds": t.seconds, "model_rss_gib": model_gib, "device": str(device)}
if device.type == "cuda":
    fields["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
if result is not None:
    fields["summary"] = {k: v for k, v in result.summary.items() if k != "fallback_sites"}
    fields["fallback_sites"] = len(result.summary.get("fallback_sites", []))
    started = time.perf_counter()
    model.to(device).eval()
    fields |= score(lambda ids: model(ids.to(device)).logits.cpu(), spec)
    fields["eval_s"] = time.perf_counter() - started
finish(spec, **fields)
