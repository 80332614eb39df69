"""Resumable GPTQ: each solved decoder block (its weights and grids) is written to the resume folder atomically,
and a rerun loads it instead of solving it again."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file

from dscompress.models.adapters import WeightTarget
from dscompress.quant.qstate import QuantState


def block_path(resume_dir: Path | None, index: int) -> Path | None:
    return resume_dir / f"block-{index:04d}.safetensors" if resume_dir else None


def save_block(path: Path, layer, state: QuantState, names: list[str]) -> None:
    tensors = {f"layer.{k}": v.detach().cpu().contiguous() for k, v in layer.state_dict().items()}
    for name in names:
        for part in ("scale", "zero"):
            tensors[f"q.{name}.{part}"] = state.tensors[f"{name}.{part}"]
    tmp = path.with_name(f".tmp-{path.name}")
    save_file(tensors, str(tmp))
    tmp.replace(path)  # atomic: a block file exists only when complete


def load_block(path: Path, layer, state: QuantState, targets: list[WeightTarget], high: dict) -> None:
    tensors = load_file(str(path))
    layer.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("layer.")})
    for t in targets:
        state.add(t.name, t.kind, t.param.shape, tensors[f"q.{t.name}.scale"], tensors[f"q.{t.name}.zero"],
                  high.get(t.name))  # fmt: skip
