"""`distill` pass: the student (the stage's input) learns the teacher's next-token distribution.

Loss: forward KL(teacher || student) on logits at `temperature` (times T^2), optionally mixed with cross-entropy
on the text (`ce_weight`), plus an optional hidden-state loss (MSE or cosine) on chosen student layers.

Layer mapping (student layer j -> teacher layer): when the student came from a `prune` stage of this teacher,
its manifest's `kept_layers` says which teacher layer each student layer was; otherwise layers are aligned by
depth, j -> round((j + 1) * L_teacher / L_student) - 1. Width: after hidden pruning the teacher's hidden
states are read at the student's kept channels (`kept.hidden` in the prune stage's importance.safetensors);
any other width mismatch gets a learned linear projection that is trained with the student and then dropped.

Quantized students (an rtn/gptq stage as input) keep their grid: `quantized: ste` trains through fake
quantization on the stored scales with a straight-through estimator and snaps onto the grid at the end (same
scales, zero points and metadata); `quantized: requantize` trains in float, then re-runs round-to-nearest with
the stage's bits, group size and symmetry (new scales). W8A8 students are refused: their activation scales were
calibrated on the old weights; distill first, then run int8.

The training loop is distill_loop.py; `devices` > 1 launches it under torch.distributed (accelerate, DDP).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dscompress.context import PassOutput, StageContext


class Budget(BaseModel):
    """Stop after `tokens` training tokens or `minutes` of training, whichever comes first."""

    model_config = ConfigDict(extra="forbid")
    tokens: int | None = Field(None, ge=1, description="training tokens (global, across devices)")
    minutes: float | None = Field(None, gt=0, description="wall-clock minutes of training")

    @model_validator(mode="after")
    def _one(self):
        if self.tokens is None and self.minutes is None:
            raise ValueError("give tokens, minutes or both")
        return self


class HiddenLoss(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layers: list[int] = Field(min_length=1, description="student decoder layers whose outputs are matched")
    loss: Literal["mse", "cosine"] = "cosine"
    weight: float = Field(1.0, gt=0)


class DistillConfig(BaseModel):
    """`distill:` stage. Example: `{budget: {tokens: 2000000}, lr: 1e-4}`."""

    model_config = ConfigDict(extra="forbid")
    teacher: str = Field("baseline", description="'baseline', an earlier stage's name, or a checkpoint path")
    budget: Budget
    temperature: float = Field(1.0, gt=0)
    ce_weight: float = Field(0.0, ge=0, le=1, description="loss = (1 - w) * KL + w * cross-entropy")
    hidden: HiddenLoss | None = None
    lr: float = Field(1e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decay ends at lr * this")
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(8, ge=1, description="windows per optimizer step, across all devices")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step (batch_size is split)")
    max_grad_norm: float = Field(1.0, gt=0)
    eval_every: int = Field(50, ge=1, description="optimizer steps between evaluations (gate checks)")
    stop_when_gate_met: bool = True
    checkpoint_every: int = Field(50, ge=1, description="optimizer steps between resumable checkpoints")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on GPU")
    devices: int | Literal["auto"] = Field(1, description="processes (GPUs); auto: every visible GPU")
    quantized: Literal["ste", "requantize"] = "ste"
    teacher_topk: int | None = Field(None, ge=1, description="precompute the teacher's top-k log-probs to disk")

    @model_validator(mode="after")
    def _split(self):
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} does not split into grad_accum {self.grad_accum} parts")
        if self.hidden and self.teacher_topk:
            raise ValueError("hidden-state loss needs the live teacher; drop teacher_topk or hidden")
        return self


def check(config: DistillConfig, info) -> list[tuple[str, str]]:
    layers = info.config.get_text_config().num_hidden_layers
    problems = []
    if config.hidden and (bad := [i for i in config.hidden.layers if not 0 <= i < layers]):
        problems.append(("hidden.layers", f"{bad} are not student layers (0..{layers - 1})"))
    return problems


def teacher_problem(teacher: str, earlier: list[str], info) -> str | None:
    """A teacher that is neither 'baseline', an earlier stage, nor a checkpoint with the student's vocabulary."""
    if teacher in earlier:
        return None
    if "/" not in teacher and not teacher.endswith(".gguf"):
        return f"{teacher!r} is not an earlier stage; allowed: {', '.join(earlier)}, or a checkpoint path"
    from dscompress.errors import DscompressError
    from dscompress.models.info import inspect_model
    from dscompress.models.sources import resolve

    try:
        vocab = inspect_model(resolve(teacher).directory).vocab_size
    except DscompressError as exc:
        return str(exc)
    if vocab != info.vocab_size:
        return (f"{teacher} has a vocabulary of {vocab} and the student {info.vocab_size}; distillation matches "
                "next-token distributions, so both need the same tokenizer")  # fmt: skip
    return None


def apply(model, config: DistillConfig, ctx: StageContext) -> PassOutput:
    from dscompress.compress import distill_loop

    job = distill_loop.prepare(model, config, ctx)
    result = distill_loop.run(job, model, ctx)
    return PassOutput(result.model, quant=result.quant, summary=result.summary, quant_invalidated=False)
