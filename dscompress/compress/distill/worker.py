"""One distillation worker under torch.distributed.run: `python -m dscompress.compress.distill.worker job.json`.

Started by loop.launch, one per device. accelerate sets up the process group (gloo on CPU, NCCL on GPU)
and wraps the student in DDP; the loop is the same as in one process. Rank 0 evaluates, checkpoints, reports
progress to progress.json and writes the final weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from dscompress.atomic import atomic_save_safetensors, atomic_write_json
from dscompress.compress.distill import lora
from dscompress.compress.distill.job import DistillJob
from dscompress.compress.distill.loop import Job, build_loop, eager
from dscompress.compress.distill.train import Shapes, weights
from dscompress.context import EvalSpec
from dscompress.models.load import load_model
from dscompress.quant.qstate import QuantState


def main(path: Path) -> None:
    from accelerate import Accelerator

    spec = DistillJob.read(path)
    wdir = path.parent
    acc = Accelerator(cpu=spec.device == "cpu", mixed_precision="bf16" if spec.bf16 else "no")
    config = spec.config
    windows = load_file(str(wdir / "windows.safetensors"))
    student = load_model(wdir / "student-init", spec.dtype)
    quant = QuantState.load(spec.input_dir) if spec.quantized else None
    ev = spec.eval
    evaluation = EvalSpec(windows["eval"], ev.ref_dir, ev.batch_size, ev.gate, ev.baseline, ev.previous) \
        if ev and acc.is_main_process else None  # fmt: skip
    job = Job(
        config=config, teacher_dir=spec.teacher_dir, input_dir=spec.input_dir, train=windows["train"],
        evaluation=evaluation, state_dir=spec.state_dir, seed=spec.seed,
        shapes=Shapes(spec.layer_map, spec.hidden_index), dtype=spec.dtype, quant=quant,
        teacher_width=spec.teacher_width, topk_file=spec.topk_file,
    )  # fmt: skip

    def on_progress(info: dict) -> None:
        if acc.is_main_process:
            atomic_write_json(wdir / "progress.json", info)

    loop, adapters = build_loop(job, student, acc, on_progress, evaluation)
    trained = eager(loop.run())
    if acc.is_main_process:
        summary = lora.finish(trained, adapters, config.lora)  # merged: the parent loads plain weights
        atomic_save_safetensors(weights(trained), wdir / "final.safetensors")
        atomic_write_json(wdir / "state.json", loop.state.__dict__ | {"adapters": summary})
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main(Path(sys.argv[1]))
