"""GPTQ on several devices: `gptq: {devices: N}` (or `auto`) starts one worker per GPU (gloo processes on CPU).

Data parallel over the calibration windows, the same algorithm as one device:
- each rank captures layer 0's inputs for its share of the windows and runs every block over them;
- before a weight group is solved, the ranks average their Hessians (weighted by token counts), so each holds
  the Hessian of all windows; a MoE expert's routed-token count is summed too, so the RTN fallback agrees;
- the solves are split: the rows of a stacked dense group (GPTQ treats rows independently given H) and whole
  experts (expert e on rank e % N) go to different ranks, and every rank receives the others' results;
- each rank then computes its windows' outputs from the full quantized block: block k+1 sees quantized block k.
The result equals one device's up to the order of floating-point sums in the Hessian reduction. Rank 0 writes
the resume block files (a killed run resumes at the next block, on any number of devices) and the result, which
this process loads: `python -m dscompress.compress.gptq.dist job.json` is the worker.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from safetensors.torch import load_file, save_file

from dscompress.atomic import atomic_dir, atomic_write_json
from dscompress.compress import cluster
from dscompress.compress.gptq.config import GPTQConfig
from dscompress.compress.gptq.ranks import Ranks
from dscompress.compress.gptq.solve import quantize
from dscompress.compress.workers import WorkerJob, run_workers
from dscompress.context import PassOutput, StageContext, make_progress
from dscompress.errors import ModelSourceError, RecipeError
from dscompress.models.adapters import adapter_for
from dscompress.models.stream import Shards, check_names, load_layers, load_streamed, stream_of
from dscompress.quant.qstate import QuantState


class GPTQJob(WorkerJob):
    """What every GPTQ worker reads: the pass config, where the input checkpoint is, where resume blocks go."""

    config: GPTQConfig
    model_dir: Path
    layers_dir: Path | None = None  # where rank 0 writes each finished layer's shard
    resume_dir: Path | None = None


def launch(model, config: GPTQConfig, ctx: StageContext, world: int) -> PassOutput:
    """Run the pass in `world` worker processes and load rank 0's result into `model`."""
    with tempfile.TemporaryDirectory(prefix="dscompress-gptq-") as scratch:
        wdir = (ctx.resume_dir or Path(scratch)) / "workers"
        wdir.mkdir(parents=True, exist_ok=True)
        if ctx.input_dir is not None and streamable(ctx.input_dir, model, ctx.adapter):
            model_dir = ctx.input_dir  # the stage's input is exactly `model`: the workers read it themselves
        else:  # workers stream their layers, which needs transformers' own tensor names: written here once
            model_dir = wdir / "input"
            model.save_pretrained(model_dir)
        save_file({"calibration": ctx.calibration().contiguous()}, str(wdir / "windows.safetensors"))
        stream = stream_of(model)  # streamed: the layers go straight to the stage folder
        layers_dir = ctx.output_dir if stream is not None else wdir / "layers"
        layers_dir.mkdir(parents=True, exist_ok=True)
        GPTQJob(config=config, model_dir=model_dir, dtype=ctx.dtype, device=ctx.device.type, seed=ctx.seed,
                layers_dir=layers_dir, resume_dir=ctx.resume_dir).write(wdir / "job.json")  # fmt: skip
        task = ctx.progress.add_task(f"gptq int{config.bits} g{config.group_size} on {world} devices", total=None)

        def on_progress(info: dict) -> None:
            ctx.progress.update(task, completed=info["done"], total=info["total"])

        threads = max(1, (os.cpu_count() or 1) // world) if ctx.device.type == "cpu" else 4
        started = time.perf_counter()
        try:
            run_workers("dscompress.compress.gptq.dist", wdir / "job.json", world, on_progress, threads)
        finally:
            ctx.progress.remove_task(task)
        workers_done = time.perf_counter()
        state = QuantState.load(wdir / "result")
        if stream is not None:
            stream.adopt(layers_dir)
        else:
            load_layers(model, ctx.adapter, layers_dir)
        load_result(model, load_file(str(wdir / "result" / "weights.safetensors")), state)
        summary = json.loads((wdir / "result" / "summary.json").read_text())
        summary["launcher_seconds"] = {"workers": round(workers_done - started, 2),
                                       "take_result": round(time.perf_counter() - workers_done, 2)}  # fmt: skip
    return PassOutput(model, quant=state, summary=summary)


def streamable(directory: Path, model, adapter) -> bool:
    """Whether the workers can read `directory` layer by layer (its tensors carry the names the model uses)."""
    try:
        check_names(directory, model, adapter, Shards(directory))
    except (ModelSourceError, OSError, ValueError, KeyError):
        return False
    return True


def lead(model, config: GPTQConfig, ctx: StageContext) -> PassOutput:
    """Rank 0 under an outside launcher (compress/cluster.py): hand the job to every rank, then run the same
    data-parallel pass as `devices: N` here, on the runner's own model and progress display."""
    if ctx.input_dir is None:
        raise RecipeError("gptq under an outside launcher needs its input on disk (a recipe stage's input)")
    if not streamable(ctx.input_dir, model, ctx.adapter):
        raise RecipeError(
            f"gptq under an outside launcher: every rank reads {ctx.input_dir} layer by layer, and its tensors are "
            "not under the architecture's own names (it loads only through transformers' key mapping). Fix: save "
            "the model once with transformers' save_pretrained and point model.path at that copy"
        )
    job = GPTQJob(config=config, model_dir=ctx.input_dir, dtype=ctx.dtype, device=ctx.device.type, seed=ctx.seed,
                  resume_dir=ctx.resume_dir)  # fmt: skip
    windows = ctx.calibration()
    cluster.send({"handler": "dscompress.compress.gptq.dist:follow", "job": job.model_dump_json(), "windows": windows})
    try:
        return quantize(model, config, ctx, Ranks())
    except BaseException as exc:
        raise cluster.mark_job_failure(exc) from None


def follow(message: dict) -> None:
    """A rank > 0 under an outside launcher: the job rank 0 sent, on this rank's device; rank 0 keeps the result."""
    spec = GPTQJob.model_validate_json(message["job"])
    model = load_streamed(spec.model_dir, spec.dtype)  # rank 0 keeps the result: this rank drops each layer
    windows = message["windows"]
    console = Console(stderr=True, quiet=True)
    with make_progress(console) as progress:
        ctx = StageContext(adapter_for(model.config), cluster.device(), spec.seed, console, progress,
                           lambda: windows, resume_dir=spec.resume_dir)  # fmt: skip
        quantize(model, spec.config, ctx, Ranks())


def target_param(model, name: str, kind: str) -> torch.Tensor:
    """The parameter a QuantState target names: a Linear's weight, or a stacked expert parameter."""
    parent, attr = (name, "weight") if kind == "linear" else name.rsplit(".", 1)
    return getattr(model.get_submodule(parent), attr)


def load_result(model, weights: dict[str, torch.Tensor], state: QuantState) -> None:
    """The quantized weights outside the decoder layers (lm_head); the layers come from their shards."""
    with torch.no_grad():
        for name, tensor in weights.items():
            param = target_param(model, name, state.targets[name]["kind"])
            param.copy_(tensor.to(param.dtype))


def save_result(model, out: PassOutput, directory: Path) -> None:
    """The grid, the summary, and the quantized weights that are not in a layer shard (lm_head)."""
    params = {n: target_param(model, n, m["kind"]) for n, m in out.quant.targets.items()}
    weights = {n: p.detach().cpu().contiguous() for n, p in params.items() if not p.is_meta}
    with atomic_dir(directory) as tmp:
        out.quant.save(tmp)
        save_file(weights, str(tmp / "weights.safetensors"))
        atomic_write_json(tmp / "summary.json", out.summary)


class _WorkerContext(StageContext):
    """Rank 0 reports each finished block to progress.json, which the launching process shows."""

    progress_file: Path | None = None

    def track(self, items, description):
        items = list(items)
        for done, item in enumerate(items):
            yield item
            if self.progress_file is not None:
                atomic_write_json(self.progress_file, {"done": done + 1, "total": len(items)})


def main(job: Path) -> None:
    import torch.distributed as dist

    started = time.perf_counter()
    spec = GPTQJob.read(job)
    cuda = spec.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    comm = Ranks()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    model = load_streamed(spec.model_dir, spec.dtype)  # each layer is read when this rank reaches it
    windows = load_file(str(job.parent / "windows.safetensors"))["calibration"]
    console = Console(stderr=True, quiet=True)
    with make_progress(console) as progress:
        ctx = _WorkerContext(adapter_for(model.config), device, spec.seed, console, progress, lambda: windows,
                             resume_dir=spec.resume_dir, output_dir=spec.layers_dir)  # fmt: skip
        ctx.progress_file = job.parent / "progress.json" if comm.rank == 0 else None
        ready = time.perf_counter()
        out = quantize(model, spec.config, ctx, comm)
    if comm.rank == 0:
        out.summary["worker_seconds"] = {"start": round(ready - started, 2), "since_import": round(
            time.perf_counter() - started, 2)}  # fmt: skip
        save_result(model, out, job.parent / "result")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
