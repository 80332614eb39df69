"""The one object that carries run-scoped resources into passes. No globals."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from dscompress.calibrate.metrics import BaselineRef, evaluate
from dscompress.gates import Gate, check_gate
from dscompress.models.adapters import ArchAdapter, adapter_for
from dscompress.quant.qstate import QuantState

T = TypeVar("T")


HEARTBEAT_S = 30.0  # without a terminal (CI logs), a progress line at least this often on long steps
EVERY_ITEM_UP_TO = 200  # ... and one per item for loops this short (layers, stages)


class RateColumn(ProgressColumn):
    """Items per second (or seconds per item, for slow steps such as GPTQ's decoder layers)."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        if not speed:
            return Text("")
        return Text(f"{speed:.2f}/s" if speed >= 1 else f"{1 / speed:.1f} s/it", style="dim")


def make_progress(console: Console) -> Progress:
    """Bars with count, elapsed time, rate and ETA on a terminal. Without one (a CI log, a pipe) rich draws
    nothing, so `tracked` and `spinner` print timestamped lines instead."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        RateColumn(),
        TextColumn("[dim]ETA[/dim]"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


def _log(progress: Progress, text: str) -> None:
    """A timestamped plain line, for a console that is not a terminal (rich's live display is off there)."""
    if not progress.console.is_terminal:
        progress.console.print(f"{time.strftime('%H:%M:%S')} {text}", highlight=False, markup=False, soft_wrap=True)


def tracked(progress: Progress, items: Iterable[T], description: str) -> Iterator[T]:
    """Iterate `items` under a progress bar that disappears when done; without a terminal, a line per item for
    short loops (layers) and at least every HEARTBEAT_S seconds for long ones, each with an ETA."""
    items = list(items)
    n = len(items)
    task = progress.add_task(description, total=n)
    start = last = time.monotonic()
    try:
        for i, item in enumerate(items, 1):
            yield item
            progress.advance(task)
            now = time.monotonic()
            if n <= EVERY_ITEM_UP_TO or now - last >= HEARTBEAT_S or i == n:
                eta = (now - start) / i * (n - i)
                _log(progress, f"{description}: {i}/{n} ({now - start:.0f} s, ETA {eta:.0f} s)")
                last = now
    finally:
        progress.remove_task(task)


@contextlib.contextmanager
def spinner(progress: Progress, description: str) -> Iterator[None]:
    """An indeterminate task in the same live display (rich allows one live display at a time); without a
    terminal, a line when it starts and one when it ends."""
    task = progress.add_task(description, total=None)
    start = time.monotonic()
    _log(progress, f"{description} ...")
    try:
        yield
    finally:
        progress.remove_task(task)
    _log(progress, f"{description}: done in {time.monotonic() - start:.1f} s")


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
    gate: Gate | None = None  # the stage's gate, for passes that search until it would hold (int8)
    # For passes that train (distill):
    train: Callable[[], torch.Tensor] | None = None  # training windows, disjoint from eval and calibration
    evaluate: Callable | None = None  # model -> (pipeline metrics, gate met); EvalSpec
    stage_dir: Callable[[str], Path] | None = None  # "baseline" or an earlier stage's name -> its artifact
    input_dir: Path | None = None  # the artifact this stage reads
    quant: QuantState | None = None  # the input's quantization metadata
    dtype: str = "float32"
    output_dir: Path | None = None  # the stage folder being written: a streamed model's layers go there

    def track(self, items: Iterable[T], description: str) -> Iterator[T]:
        return tracked(self.progress, items, description)

    @classmethod
    @contextlib.contextmanager
    def standalone(
        cls,
        model,
        calibration: torch.Tensor | None = None,
        device: str | torch.device = "cpu",
        seed: int = 0,
        quiet: bool = False,
        **fields,
    ) -> Iterator[StageContext]:
        """A context for running one pass on `model` outside a recipe (tests, benchmarks, notebooks): its own
        console on stderr and progress display, the model's adapter, and fixed calibration windows."""
        console = Console(stderr=True, quiet=quiet)
        with make_progress(console) as progress:
            yield cls(adapter_for(model.config), torch.device(device), seed, console, progress,
                      lambda: calibration, **fields)  # fmt: skip


@dataclass
class PassOutput:
    model: torch.nn.Module
    quant: QuantState | None = None  # None: the input's quantization metadata (if any) carries over
    summary: dict = field(default_factory=dict)  # shown in the manifest and report
    files: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # extra safetensors for the stage dir
    quant_invalidated: bool = False  # the input's quantization metadata no longer describes the model (pruning)


@dataclass
class EvalSpec:
    """The pipeline's evaluation and the stage gate, rebuildable in a worker process: passes that train call it to
    learn whether the gate would already hold (`StageContext.evaluate`)."""

    windows: torch.Tensor
    ref_dir: Path
    batch_size: int
    gate: dict | None  # recipe.Gate as JSON
    baseline: dict
    previous: dict

    def __call__(self, model) -> tuple[dict, bool]:
        device = next(model.parameters()).device
        metrics = evaluate(model, self.windows, BaselineRef(self.ref_dir), self.batch_size, device)
        if self.gate is None:
            return metrics, False
        verdicts = check_gate(Gate.model_validate(self.gate), metrics, self.baseline, self.previous)
        return metrics, all(v.passed for v in verdicts)
