"""Setting up a distillation run: teacher, layer and width mappings, quantized students, devices, results.

One device: the loop runs in this process (`SingleDevice` stands in for accelerate's Accelerator: same calls, no
global state). Several: the student, teacher path, data and evaluation are written to the stage's resume directory
and `torch.distributed.run` starts one worker per device (`python -m dscompress.compress.distill.worker`), which
runs the same loop under accelerate (DDP; gloo on CPU, NCCL on GPU). This process shows the workers' progress
and loads rank 0's result.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dscompress.artifact import read_manifest
from dscompress.atomic import atomic_save_safetensors, sha256_file
from dscompress.compress.distill import lora, ste
from dscompress.compress.distill.config import DistillConfig
from dscompress.compress.distill.job import DistillJob, EvalRecord
from dscompress.compress.distill.train import Capture, Loop, Shapes, load_weights
from dscompress.compress.workers import run_workers, world_size
from dscompress.context import EvalSpec
from dscompress.errors import RecipeError
from dscompress.models.adapters import adapter_for
from dscompress.models.load import load_config, load_model
from dscompress.quant.qstate import QuantState


class SingleDevice:
    """The subset of accelerate.Accelerator the loop uses, for one process on one device."""

    process_index, num_processes, is_main_process = 0, 1, True

    def __init__(self, device: torch.device, bf16: bool):
        self.device, self.bf16 = device, bf16

    def prepare(self, *objects):
        return objects

    def backward(self, loss):
        loss.backward()

    def no_sync(self, model):
        return contextlib.nullcontext()

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def clip_grad_norm_(self, params, max_norm):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def unwrap_model(self, model):
        return model

    def wait_for_everyone(self):
        pass


def layer_map(student_layers: int, teacher_layers: int, kept: list[int] | None) -> list[int]:
    """Student layer j -> teacher layer: the prune stage's kept layers, else aligned by depth."""
    if kept is not None and len(kept) == student_layers:
        return kept
    return [round((j + 1) * teacher_layers / student_layers) - 1 for j in range(student_layers)]


def shapes_from_input(input_dir: Path | None, student_layers: int, teacher_layers: int, teacher_dir: Path) -> Shapes:
    """Mappings recorded by a prune stage directly on top of the teacher (else depth alignment, no index)."""
    summary, index = {}, None
    manifest = read_manifest(input_dir) if input_dir else {}
    if manifest.get("pass") == "prune" and Path(manifest.get("input", "")).resolve() == teacher_dir.resolve():
        summary = manifest.get("summary", {})
        if (input_dir / "importance.safetensors").is_file():
            found = load_file(str(input_dir / "importance.safetensors"))
            index = found["kept.hidden"].tolist() if "kept.hidden" in found else None
    return Shapes(layer_map(student_layers, teacher_layers, summary.get("kept_layers")), index)


@dataclass
class Job:
    config: DistillConfig
    teacher_dir: Path
    input_dir: Path | None  # where the student's quantization metadata lives
    train: torch.Tensor
    evaluation: EvalSpec | None
    state_dir: Path
    seed: int
    shapes: Shapes
    dtype: str
    quant: QuantState | None  # the student's weight-only quantization, or None
    teacher_width: int
    topk_file: Path | None = None  # the teacher's cached top-k log-probs, once precompute_topk wrote them


def prepare(model, config, ctx) -> Job:
    """Every refusal before any training: W8A8 students, unknown teachers, vocabulary mismatch."""
    if ctx.quant is not None and ctx.quant.block_activations:
        raise RecipeError("distill: the input stage quantizes its activations to int8 (activations: int8), whose "
                          "rounding passes no gradient; distill a stage with activations: float and set "
                          "activations: int8 on a quantizing stage after it")  # fmt: skip
    if ctx.quant is not None and ctx.quant.activations:
        raise RecipeError("distill: the input is a W8A8 stage whose activation scales were calibrated on its "
                          "current weights; distill before the int8 stage and quantize afterwards")  # fmt: skip
    teacher_dir = ctx.stage_dir(config.teacher)
    teacher_cfg = load_config(teacher_dir).get_text_config()
    student_cfg = model.config.get_text_config()
    if teacher_cfg.vocab_size != student_cfg.vocab_size:
        raise RecipeError(f"distill.teacher: {config.teacher!r} has a vocabulary of {teacher_cfg.vocab_size} and "
                          f"the student {student_cfg.vocab_size}; distillation matches next-token distributions, "
                          "so both need the same tokenizer")  # fmt: skip
    shapes = shapes_from_input(ctx.input_dir, student_cfg.num_hidden_layers, teacher_cfg.num_hidden_layers,
                               teacher_dir)  # fmt: skip
    if shapes.hidden_index is not None and len(shapes.hidden_index) != student_cfg.hidden_size:
        shapes.hidden_index = None
    return Job(config, teacher_dir, ctx.input_dir, ctx.train(), ctx.evaluate, ctx.resume_dir, ctx.seed, shapes,
               ctx.dtype, ctx.quant, teacher_cfg.hidden_size)  # fmt: skip


def precompute_topk(job: Job, device: torch.device) -> Path:
    """The teacher's top-k log-probs at the run's temperature for every training window, cached on disk."""
    cfg, path = job.config, topk_path(job)
    if path.is_file():
        return path
    teacher = load_model(job.teacher_dir, job.dtype).to(device).eval()
    logps, indices = [], []
    with torch.no_grad():
        for start in range(0, len(job.train), 4):
            logits = teacher(input_ids=job.train[start : start + 4].to(device), use_cache=False).logits.float()
            top = torch.log_softmax(logits / cfg.temperature, dim=-1).topk(cfg.teacher_topk, dim=-1)
            logps.append(top.values.half().cpu())
            indices.append(top.indices.int().cpu())
    atomic_save_safetensors({"logp": torch.cat(logps), "index": torch.cat(indices)}, path)
    del teacher
    return path


def topk_path(job: Job) -> Path:
    cfg = job.config
    return job.state_dir / f"teacher-top{cfg.teacher_topk}-T{cfg.temperature:g}-{_topk_key(job)}.safetensors"


def _topk_key(job: Job) -> str:
    """Content key of a top-k cache: the teacher's weights and config, the training windows and the dtype, so a
    teacher path whose files changed (or other text) never reuses stale log-probs."""
    digest = hashlib.sha256()
    for p in sorted(job.teacher_dir.iterdir()):
        if p.name == "config.json" or (p.suffix == ".safetensors" and p.name.startswith("model")):
            digest.update(f"{p.name}:{sha256_file(p)}".encode())
    digest.update(job.train.numpy().tobytes())
    digest.update(str(job.dtype).encode())
    return digest.hexdigest()[:16]


def compiling(job: Job, device: torch.device) -> bool:
    """`compile: auto` is on for CUDA devices (measured in docs/BENCHMARKS.md; CPUs gain little for the compile
    time and need a C++ toolchain), except for quantized students trained through their grid: torch's
    parametrization gives every parametrized Linear a class of its own, so each layer would recompile (measured:
    the recompile limit is hit after 8 layers and the rest runs eager, slower than no compile at all)."""
    setting = job.config.compile
    if setting != "auto":
        return bool(setting)
    return device.type == "cuda" and not (job.quant is not None and job.config.quantized == "ste")


def compile_layers(model: torch.nn.Module) -> int:
    """Regional compilation: torch.compile on each decoder layer in place. Layers of one class and shape share a
    single compiled graph (parameters are graph inputs), so the cost is one layer's compile, not the model's; the
    embedding, final norm, head and loss stay eager. Returns the number of layers compiled."""
    layers = adapter_for(model.config).layers(model)
    for layer in layers:
        layer.compile()
    return len(layers)


def eager(model: torch.nn.Module) -> torch.nn.Module:
    """Undo compile_layers (nn.Module.compile has no public inverse): the trained student is evaluated, merged and
    saved on the CPU, where the GPU graphs do not apply."""
    for module in model.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
    return model


def make_teacher(job: Job, device: torch.device, topk: Path | None, compiled: bool = False):
    """(rows, ids) -> teacher logits or top-k pair, and the teacher-side hidden capture (or None)."""
    if topk is not None:
        cached = load_file(str(topk))
        return (lambda rows, ids: (cached["logp"][rows].to(device), cached["index"][rows].to(device))), None
    teacher = load_model(job.teacher_dir, job.dtype).to(device).eval().requires_grad_(False)
    capture = None
    if job.config.hidden:
        wanted = sorted({job.shapes.layer_map[j] for j in job.config.hidden.layers})
        capture = Capture(adapter_for(teacher.config).layers(teacher), wanted)
    if compiled:  # after the capture hooks, which are traced into the compiled layers
        compile_layers(teacher)

    def forward(rows, ids):
        with torch.no_grad():
            return teacher(input_ids=ids, use_cache=False).logits

    return forward, capture


def build_loop(job: Job, student, acc, on_progress, evaluate) -> tuple[Loop, lora.Adapters | None]:
    """The loop with the student's adapters injected (LoRA) or its weights parametrized onto their grid (STE), and
    hidden-state captures wired; the adapters (None without LoRA)."""
    cfg = job.config
    adapters = None
    if cfg.lora is not None:
        grid = job.quant if cfg.quantized == "ste" else None
        adapters = lora.attach(student, cfg.lora, job.seed, grid)
    elif job.quant is not None and cfg.quantized == "ste":
        ste.attach_grid(student, job.quant)
    compiled = compiling(job, acc.device)
    teacher, teacher_cap = make_teacher(job, acc.device, job.topk_file, compiled)
    projections, capture = torch.nn.ModuleDict(), None
    if cfg.hidden:
        student_cap = Capture(adapter_for(student.config).layers(student), cfg.hidden.layers)
        t_width = len(job.shapes.hidden_index) if job.shapes.hidden_index else job.teacher_width
        s_width = student.config.get_text_config().hidden_size
        if s_width != t_width:
            gen = torch.Generator().manual_seed(job.seed)
            for j in cfg.hidden.layers:
                projections[str(j)] = torch.nn.Linear(s_width, t_width, bias=False)
                torch.nn.init.normal_(projections[str(j)].weight, std=s_width**-0.5, generator=gen)
        capture = (student_cap, teacher_cap, job.shapes.layer_map, job.shapes.hidden_index)
    if compiled:  # last: the compiled layers trace the adapters, grid parametrizations and capture hooks
        compile_layers(student)
    loop = Loop(acc, student, teacher, job.train, cfg, job.seed, job.state_dir, evaluate, on_progress,
                projections, capture, adapters_only=adapters is not None)  # fmt: skip
    return loop, adapters


# where merged LoRA weights end, by the student's `quantized:` mode (None: a float student)
MERGED = {None: "float", "ste": "snapped onto the stored grid", "requantize": "re-quantized (RTN)"}


@dataclass
class Result:
    model: torch.nn.Module
    quant: object | None
    summary: dict


def describe(info: dict) -> str:
    eta = ""
    if info["total"] and info["step"]:
        eta = f" ETA {(info['total'] - info['step']) * info['elapsed_s'] / info['step'] / 60:.1f} min"
    return f"distill loss {info['loss']:.4f} {info['tokens_per_s']:,.0f} tok/s{eta}"


def run(job: Job, model, ctx) -> Result:
    cfg = job.config
    world = world_size(cfg.devices, ctx.device, "distill")
    if (cfg.batch_size // cfg.grad_accum) % world:
        raise RecipeError(f"distill: micro-batches of {cfg.batch_size // cfg.grad_accum} windows do not split "
                          f"across {world} devices; make batch_size / grad_accum a multiple of {world}")  # fmt: skip
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and ctx.device.type == "cuda")
    if cfg.teacher_topk:  # hashed and written once here; workers get the path
        job.topk_file = precompute_topk(job, ctx.device)
    task = ctx.progress.add_task("distill", total=None)

    def on_progress(info: dict) -> None:
        ctx.progress.update(task, completed=info["step"], total=info["total"], description=describe(info))

    if world > 1:
        state = launch(job, model, world, bf16, ctx.device, on_progress)
        adapters = state.pop("adapters")
    else:
        loop, adapters = build_loop(job, model, SingleDevice(ctx.device, bf16), on_progress, job.evaluation)
        eager(loop.run())
        state = loop.state.__dict__
        adapters = lora.finish(model, adapters, cfg.lora)
    ctx.progress.remove_task(task)
    model.to("cpu")
    if job.quant is not None and cfg.quantized == "ste":  # merged LoRA weights get their grid back first
        ste.snap_to_grid(ste.parametrized(model) or ste.attach_grid(model, job.quant))
    quant = ste.requantize(model, job.quant) if job.quant and cfg.quantized == "requantize" else None
    if adapters:
        adapters["merged"] = MERGED[cfg.quantized if job.quant else None]
    summary = {
        "teacher": cfg.teacher, "world_size": world, "precision": "bf16" if bf16 else "fp32",
        "compiled": compiling(job, ctx.device),
        "steps": state["step"], "tokens": state["tokens"], "train_seconds": state["elapsed_s"],
        "tokens_per_s": state["tokens"] / max(state["elapsed_s"], 1e-9), "stopped_by": state["stopped_by"],
        "resumed_from_step": state["resumed_from"], "schedule_steps": state["total_steps"],
        "layer_map": job.shapes.layer_map if cfg.hidden else None,
        "hidden_channels_from_prune": job.shapes.hidden_index is not None,
        "quantized": cfg.quantized if job.quant else None, "lora": adapters,
        "eval_seconds": state["eval_s"], "checkpoint_seconds": state["checkpoint_s"],
        "train_tokens_per_s": state["tokens"] / max(state["elapsed_s"] - state["eval_s"] - state["checkpoint_s"],
                                                    1e-9),
        "history": state["history"],
    }  # fmt: skip
    return Result(model.eval(), quant, summary)


def launch(job: Job, model, world: int, bf16: bool, device: torch.device, on_progress) -> dict:
    """One worker per device under torch.distributed.run; returns rank 0's final TrainState and adapters' summary.
    The workers merge LoRA adapters before writing the weights; full STE weights load into the grid's
    parametrization, which run() then snaps."""
    wdir = job.state_dir / "worker"
    wdir.mkdir(parents=True, exist_ok=True)
    (wdir / "progress.json").unlink(missing_ok=True)
    model.save_pretrained(wdir / "student-init")
    ev = job.evaluation
    save_file({"train": job.train, **({"eval": ev.windows} if ev else {})}, str(wdir / "windows.safetensors"))
    record = EvalRecord(ref_dir=ev.ref_dir, batch_size=ev.batch_size, gate=ev.gate, baseline=ev.baseline,
                        previous=ev.previous) if ev else None  # fmt: skip
    DistillJob(
        config=job.config, teacher_dir=job.teacher_dir, input_dir=job.input_dir, state_dir=job.state_dir,
        topk_file=job.topk_file, seed=job.seed, layer_map=job.shapes.layer_map, hidden_index=job.shapes.hidden_index,
        dtype=job.dtype, teacher_width=job.teacher_width, bf16=bf16, device=device.type,
        quantized=job.quant is not None, eval=record,
    ).write(wdir / "job.json")  # fmt: skip
    run_workers("dscompress.compress.distill.worker", wdir / "job.json", world, on_progress)
    if job.quant and job.config.quantized == "ste" and job.config.lora is None:
        ste.attach_grid(model, job.quant)
    load_weights(model, load_file(str(wdir / "final.safetensors")))
    return json.loads((wdir / "state.json").read_text())
