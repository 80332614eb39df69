"""What text a recipe reads and how it is split (torch-free: the recipe schema imports it; data.py cuts the
windows)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dscompress.schema import Strict

BUILTIN_SOURCES = ("builtin:pydoc", "builtin:stdlib-docstrings")


class SplitSpec(Strict):
    samples: int | Literal["all"] = Field(description="number of windows, or all the split holds")
    seq_len: int = Field(ge=8, description="tokens per window")


class Fractions(Strict):
    eval: float = Field(0.2, gt=0, lt=1, description="share of the corpus's windows for evaluation")
    calibration: float = Field(0.35, gt=0, lt=1, description="share of the corpus's windows for calibration")
    train: float = Field(0.45, gt=0, lt=1, description="share of the corpus's windows for distillation training")

    @model_validator(mode="after")
    def _sum_to_one(self):
        total = self.eval + self.calibration + self.train
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"eval + calibration + train must sum to 1, got {total:g}")
        return self


class DataSpec(Strict):
    source: str = Field("builtin:pydoc", description=f"{' | '.join(BUILTIN_SOURCES)} or a .txt / .jsonl file")
    extra_train_source: str | None = Field(
        None,
        description="more text for the train split only (all of it; blocks equal to eval or calibration "
        "blocks are dropped), e.g. builtin:stdlib-docstrings",
    )
    text_field: str = Field("text", description="the key holding the text in each .jsonl line")
    fractions: Fractions = Field(default_factory=Fractions, description="share of blocks in each split")
    eval: SplitSpec = Field(
        default_factory=lambda: SplitSpec(samples=16, seq_len=512),
        description="held-out windows every stage is scored on (perplexity, KL, top-1)",
    )
    calibration: SplitSpec = Field(
        default_factory=lambda: SplitSpec(samples=64, seq_len=512),
        description="windows the quantizers calibrate on (GPTQ Hessians, INT8 ranges)",
    )
    train: SplitSpec = Field(
        default_factory=lambda: SplitSpec(samples=64, seq_len=512), description="windows distillation trains on"
    )
    batch_size: int = Field(4, ge=1, description="windows per forward pass during evaluation")

    @model_validator(mode="after")
    def _all_only_for_train(self):
        for split in ("eval", "calibration"):
            if getattr(self, split).samples == "all":
                raise ValueError(f"{split}.samples: 'all' is for the train split only; give a number of windows")
        return self
