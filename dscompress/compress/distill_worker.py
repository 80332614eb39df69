"""One distillation worker under torch.distributed.run: `python -m dscompress.compress.distill_worker job.json`.

Started by distill_loop.launch, one per device. accelerate sets up the process group (gloo on CPU, NCCL on GPU)
and wraps the student in DDP; the loop is the same as in one process. Rank 0 evaluates, checkpoints, reports
progress to progress.json and writes the final weights.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dscompress.atomic import atomic_write_json
from dscompress.compress import ste
from dscompress.compress.distill import DistillConfig
from dscompress.compress.distill_loop import EvalSpec, Job, build_loop
from dscompress.compress.distill_train import Shapes, weights
from dscompress.export.qstate import QuantState
from dscompress.models.sources import load_model


def main(path: Path) -> None:
    from accelerate import Accelerator

    spec = json.loads(path.read_text())
    wdir = path.parent
    acc = Accelerator(cpu=spec["device"] == "cpu", mixed_precision="bf16" if spec["bf16"] else "no")
    config = DistillConfig.model_validate(spec["config"])
    windows = load_file(str(wdir / "windows.safetensors"))
    student = load_model(wdir / "student-init", spec["dtype"])
    input_dir = Path(spec["input_dir"]) if spec["input_dir"] else None
    quant = QuantState.load(input_dir) if spec["quantized"] else None
    if quant is not None and config.quantized == "ste":
        ste.attach_grid(student, quant)
    ev = spec["eval"]
    evaluation = EvalSpec(windows["eval"], Path(ev["ref_dir"]), ev["batch_size"], ev["gate"], ev["baseline"],
                          ev["previous"]) if ev and acc.is_main_process else None  # fmt: skip
    job = Job(config, Path(spec["teacher_dir"]), input_dir, windows["train"], evaluation, Path(spec["state_dir"]),
              spec["seed"], Shapes(spec["layer_map"], spec["hidden_index"]), spec["dtype"], quant,
              spec["teacher_width"], Path(spec["topk_file"]) if spec["topk_file"] else None)  # fmt: skip

    def on_progress(info: dict) -> None:
        if acc.is_main_process:
            atomic_write_json(wdir / "progress.json", info)

    loop = build_loop(job, student, acc, on_progress, evaluation)
    trained = loop.run()
    if acc.is_main_process:
        save_file(weights(trained), str(wdir / "final.safetensors.tmp"))
        os.replace(wdir / "final.safetensors.tmp", wdir / "final.safetensors")
        atomic_write_json(wdir / "state.json", loop.state.__dict__)
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main(Path(sys.argv[1]))
