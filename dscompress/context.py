"""The one object that carries run-scoped resources into passes. No globals."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dscompress.export.qstate import QuantState
from dscompress.models.adapters import ArchAdapter

T = TypeVar("T")


def make_progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def tracked(progress: Progress, items: Iterable[T], description: str) -> Iterator[T]:
    """Iterate `items` under a progress bar that disappears when done."""
    items = list(items)
    task = progress.add_task(description, total=len(items))
    try:
        for item in items:
            yield item
            progress.advance(task)
    finally:
        progress.remove_task(task)


@contextlib.contextmanager
def spinner(progress: Progress, description: str) -> Iterator[None]:
    """An indeterminate task in the same live display (rich allows one live display at a time)."""
    task = progress.add_task(description, total=None)
    try:
        yield
    finally:
        progress.remove_task(task)


@dataclass
class StageContext:
    """What a pass may use: the architecture adapter, device, seed, data and a place for extra files."""

    adapter: ArchAdapter
    device: torch.device
    seed: int
    console: Console
    progress: Progress
    calibration: Callable[[], torch.Tensor]  # lazily built calibration windows, (N, T) int64
    resume_dir: Path | None = None  # survives a killed run (same stage key); removed once the stage is complete
    gate: object | None = None  # the stage's recipe.Gate, for passes that search until it would hold (int8)
    # For passes that train (distill):
    train: Callable[[], torch.Tensor] | None = None  # training windows, disjoint from eval and calibration
    evaluate: Callable | None = None  # model -> (pipeline metrics, gate met); distill_loop.EvalSpec
    stage_dir: Callable[[str], Path] | None = None  # "baseline" or an earlier stage's name -> its artifact
    input_dir: Path | None = None  # the artifact this stage reads
    quant: QuantState | None = None  # the input's quantization metadata
    dtype: str = "float32"

    def track(self, items: Iterable[T], description: str) -> Iterator[T]:
        return tracked(self.progress, items, description)


@dataclass
class PassOutput:
    model: torch.nn.Module
    quant: QuantState | None = None  # None: the input's quantization metadata (if any) carries over
    summary: dict = field(default_factory=dict)  # shown in the manifest and report
    files: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # extra safetensors for the stage dir
    quant_invalidated: bool = False  # the input's quantization metadata no longer describes the model (pruning)
