"""The job file a distillation launch writes for its DDP workers (typed, validated, written atomically)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from dscompress.compress.distill.config import DistillConfig
from dscompress.compress.workers import WorkerJob


class EvalRecord(BaseModel):
    """EvalSpec without its windows (those travel in windows.safetensors)."""

    model_config = ConfigDict(extra="forbid")
    ref_dir: Path
    batch_size: int
    gate: dict | None  # the stage gate as JSON
    baseline: dict
    previous: dict


class DistillJob(WorkerJob):
    config: DistillConfig
    teacher_dir: Path
    input_dir: Path | None  # where the student's quantization metadata lives
    state_dir: Path
    topk_file: Path | None
    layer_map: list[int]
    hidden_index: list[int] | None
    teacher_width: int
    bf16: bool
    quantized: bool  # the student is a weight-only quantized stage (STE or requantize)
    eval: EvalRecord | None
