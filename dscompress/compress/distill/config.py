"""`distill:` stage configuration (torch-free: the recipe schema imports it)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


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
    loss: Literal["mse", "cosine"] = Field(
        "cosine", description="mse or cosine distance between matched student and teacher hidden states"
    )
    weight: float = Field(1.0, gt=0, description="weight of the hidden-state loss beside the logit KL")


class LoraSettings(BaseModel):
    """`lora:` inside `distill:`: train low-rank adapters (peft) on a frozen student instead of every weight."""

    model_config = ConfigDict(extra="forbid")
    rank: int = Field(16, ge=1, le=1024, description="adapter rank r (each adapted Linear gains r x (in + out))")
    alpha: float = Field(32.0, gt=0, description="adapter scale numerator: the update is (alpha / rank) * B A")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter path's input while training")
    targets: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Linear module names to adapt (suffixes such as q_proj, down_proj), or all-linear: every Linear "
        "of the decoder but lm_head (routed experts stored as stacked weights stay frozen)",
    )


class DistillConfig(BaseModel):
    """`distill:` stage. Example: `{budget: {tokens: 2000000}, lr: 1e-4}`."""

    model_config = ConfigDict(extra="forbid")
    teacher: str = Field("baseline", description="'baseline', an earlier stage's name, or a checkpoint path")
    budget: Budget = Field(description="how much to train: tokens, steps or minutes")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of the logit KL")
    ce_weight: float = Field(0.0, ge=0, le=1, description="loss = (1 - w) * KL + w * cross-entropy")
    hidden: HiddenLoss | None = Field(None, description="also match hidden states layer by layer (optional)")
    lr: float = Field(1e-4, gt=0, description="peak learning rate (AdamW, cosine schedule after warmup)")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decay ends at lr * this")
    warmup_steps: int = Field(10, ge=0, description="linear warmup steps")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    batch_size: int = Field(8, ge=1, description="windows per optimizer step, across all devices")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step (batch_size is split)")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    eval_every: int = Field(50, ge=1, description="optimizer steps between evaluations (gate checks)")
    stop_when_gate_met: bool = Field(True, description="stop early once an evaluation meets the stage gate")
    checkpoint_every: int = Field(50, ge=1, description="optimizer steps between resumable checkpoints")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on GPU")
    devices: int | Literal["auto"] = Field(1, description="processes (GPUs); auto: every visible GPU")
    compile: bool | Literal["auto"] = Field(
        "auto",
        description="torch.compile each decoder layer of the student and the teacher (compiled once, reused by "
        "every layer of the same shape); auto: on GPUs, where it is measured faster, off on CPUs and for quantized "
        "students trained through their grid (quantized: ste), whose parametrized layers would recompile one by one",
    )
    quantized: Literal["ste", "requantize"] = Field(
        "ste",
        description="quantized students: ste keeps weights on their grid; requantize re-quantizes at the end (with "
        "lora: ste trains the adapters through the grid and snaps the merged weights onto it; requantize trains "
        "them over the frozen grid weights and re-quantizes the merged ones)",
    )
    lora: LoraSettings | None = Field(
        None,
        description="train LoRA adapters instead of every weight (optimizer state for the adapters only); merged "
        "into the weights at the end, so the stage is a stock checkpoint",
    )
    teacher_topk: int | None = Field(None, ge=1, description="precompute the teacher's top-k log-probs to disk")

    @model_validator(mode="after")
    def _split(self):
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} does not split into grad_accum {self.grad_accum} parts")
        if self.hidden and self.teacher_topk:
            raise ValueError("hidden-state loss needs the live teacher; drop teacher_topk or hidden")
        return self
