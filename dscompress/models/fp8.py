"""FP8 source checkpoints (DeepSeek-V3/R1, Qwen3-FP8): float8_e4m3fn weights with `weight_scale_inv` block
scales, dequantized to bfloat16 one shard at a time.

The layout (DeepSeek-V3's `quantization_config`): `quant_method: fp8`, `fmt: e4m3`, `weight_block_size:
[128, 128]`; each quantized `<module>.weight` (float8_e4m3fn, rows x cols, or experts x rows x cols) has a float32
`<module>.weight_scale_inv` of shape (ceil(rows / 128), ceil(cols / 128)) (with the same leading dims), and the
float weight is `w8.float() * scale_inv` over each 128 x 128 block (edge blocks are partial). Source: DeepSeek-V3's
inference code `fp8_cast_bf16.py` / `weight_dequant`, and transformers' FineGrainedFP8 integration.

Two ways in. In memory (`import_fp8`): one source shard (and a scale tensor borrowed from another shard, when the
index puts it there) at a time; the bf16 result is written shard by shard with the source's index. The converted
checkpoint lands in the model cache, so every pass and exporter reads it like any checkpoint (disk: bf16 is twice
the FP8 size). Streamed (`model.stream: true`, `FP8Layout`): nothing is converted; each weight is dequantized as
its layer is read, so a 671B checkpoint needs no 1.3 TB bf16 copy on disk.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dscompress.artifact import copy_side_files
from dscompress.atomic import atomic_dir
from dscompress.errors import ModelSourceError

FP8_DTYPES = {"e4m3": torch.float8_e4m3fn}
_HEADER_DTYPES = {"e4m3": "F8_E4M3"}  # safetensors' names for them
SCALE_SUFFIX = "_scale_inv"


def read_fp8_scheme(qc: dict, where: Path) -> tuple[int, int]:
    """The block size of an `fp8` quantization_config; a one-line refusal for what we cannot read."""
    fmt = qc.get("fmt", "e4m3")
    if fmt not in FP8_DTYPES:
        raise ModelSourceError(
            f"{where}: quantization_config.fmt {fmt!r} is not a known FP8 format; dscompress reads "
            f"{', '.join(FP8_DTYPES)} (DeepSeek-V3 / Qwen3-FP8 layout). Fix: convert the checkpoint to bf16 first"
        )
    block = qc.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ModelSourceError(
            f"{where}: quantization_config.weight_block_size {block!r}: expected two positive integers such as "
            "[128, 128] (per-tensor FP8 scales are not supported yet)"
        )
    return block[0], block[1]


def check_scale(name: str, shape: tuple, scale_shape: tuple, block: tuple[int, int]) -> None:
    """Refuse block scales whose shape does not tile a weight of `shape` with `block`-sized blocks."""
    rows, cols = shape[-2:]
    expect = (*shape[:-2], math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    if tuple(scale_shape) != expect:
        raise ModelSourceError(
            f"{name}{SCALE_SUFFIX}: shape {tuple(scale_shape)}, but a {tuple(shape)} weight with "
            f"{block[0]} x {block[1]} blocks needs {expect}. Fix: check weight_block_size in config.json"
        )


def dequantize_blocks(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], name: str) -> torch.Tensor:
    """`w` (..., rows, cols) float8 times its block scales (..., ceil(rows/b0), ceil(cols/b1)) -> bfloat16."""
    check_scale(name, tuple(w.shape), tuple(scale_inv.shape), block)
    rows, cols = w.shape[-2:]
    full = scale_inv.float().repeat_interleave(block[0], -2)[..., :rows, :].repeat_interleave(block[1], -1)
    return (w.float() * full[..., :cols]).to(torch.bfloat16)


class _Shards:
    """safe_open handles of a checkpoint's shards, opened when first needed, and the tensor -> shard map."""

    def __init__(self, source: Path):
        self.source = source
        self.handles: dict[str, object] = {}
        index = source / "model.safetensors.index.json"
        if index.exists():
            self.weight_map = json.loads(index.read_text())["weight_map"]
        else:
            self.weight_map = {k: p.name for p in source.glob("*.safetensors") for k in self.open(p.name).keys()}  # noqa: SIM118

    def open(self, shard: str):
        if shard not in self.handles:
            self.handles[shard] = safe_open(str(self.source / shard), framework="pt")
        return self.handles[shard]

    def get(self, key: str) -> torch.Tensor | None:
        shard = self.weight_map.get(key)
        return None if shard is None else self.open(shard).get_tensor(key)


def _missing_scale(key: str) -> ModelSourceError:
    return ModelSourceError(
        f"{key}: an FP8 weight without its {key}{SCALE_SUFFIX} block scales. Fix: use the complete "
        "checkpoint (every shard and its model.safetensors.index.json)"
    )


class FP8Layout:
    """Which tensors of an FP8 checkpoint are float8 and where their block scales lie, checked from the shard
    headers alone (dtype, a scale for every FP8 weight, its shape), so a streamed run refuses a bad checkpoint
    before any work, as the conversion does."""

    def __init__(self, directory: Path, files: dict[str, Path], qc: dict):
        self.block = read_fp8_scheme(qc, directory)
        fp8 = _HEADER_DTYPES[qc.get("fmt", "e4m3")]
        headers: dict[str, tuple[str, tuple]] = {}
        for path in sorted(set(files.values())):
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open handles are not dicts)
                    if files.get(name) == path:
                        part = f.get_slice(name)
                        headers[name] = (part.get_dtype(), tuple(part.get_shape()))
        self.scale_files: dict[str, Path] = {}  # FP8 weight name -> the file of its scales
        for name, (dtype, shape) in headers.items():
            if not dtype.startswith("F8"):
                continue
            if dtype != fp8:
                raise ModelSourceError(f"{name}: {dtype}, but quantization_config.fmt declares {fp8}")
            if name + SCALE_SUFFIX not in headers:
                raise _missing_scale(name)
            check_scale(name, shape, headers[name + SCALE_SUFFIX][1], self.block)
            self.scale_files[name] = files[name + SCALE_SUFFIX]

    def is_scale(self, name: str) -> bool:
        return name.endswith(SCALE_SUFFIX) and name.removesuffix(SCALE_SUFFIX) in self.scale_files

    def dequantize(self, name: str, t: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """`t` (the tensor `name` as stored) in bf16 on `device` when it is an FP8 weight, else unchanged."""
        if name not in self.scale_files:
            return t
        with safe_open(str(self.scale_files[name]), framework="pt") as f:
            scale = f.get_tensor(name + SCALE_SUFFIX)
        return dequantize_blocks(t.to(device), scale.to(device), self.block, name)


def fp8_config(config: dict) -> dict | None:
    """The `quantization_config` of an FP8 block-scaled checkpoint's config.json, or None for any other."""
    qc = config.get("quantization_config") or {}
    return qc if qc.get("quant_method") == "fp8" else None


def _convert_shard(shards: _Shards, shard: str, block: tuple[int, int], fp8: torch.dtype) -> dict:
    out = {}
    handle = shards.open(shard)
    for key in handle.keys():  # noqa: SIM118 (safe_open handles are not dicts)
        if key.endswith(SCALE_SUFFIX):
            continue
        t = handle.get_tensor(key)
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            if t.dtype != fp8:
                raise ModelSourceError(f"{key}: {t.dtype}, but quantization_config.fmt declares {fp8}")
            scale = shards.get(key + SCALE_SUFFIX)
            if scale is None:
                raise _missing_scale(key)
            t = dequantize_blocks(t, scale, block, key)
        out[key] = t
    return out


def import_fp8(source: Path, target: Path, qc: dict) -> None:
    """Write `source` (an FP8 block-scaled checkpoint) to `target` as bfloat16, shard by shard (atomically)."""
    block = read_fp8_scheme(qc, source)
    fp8 = FP8_DTYPES[qc.get("fmt", "e4m3")]
    shards = _Shards(source)
    names = sorted(set(shards.weight_map.values()))
    with atomic_dir(target) as tmp:
        sizes = {}
        for shard in names:
            tensors = _convert_shard(shards, shard, block, fp8)
            sizes.update({k: v.numel() * v.element_size() for k, v in tensors.items()})
            save_file(tensors, str(tmp / shard), metadata={"format": "pt"})
            del tensors
        if (source / "model.safetensors.index.json").exists():
            index = {"metadata": {"total_size": sum(sizes.values())},
                     "weight_map": {k: s for k, s in shards.weight_map.items() if k in sizes}}  # fmt: skip
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        config = json.loads((source / "config.json").read_text())
        del config["quantization_config"]
        config["dtype"] = "bfloat16"
        config.pop("torch_dtype", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        copy_side_files(source, tmp)
