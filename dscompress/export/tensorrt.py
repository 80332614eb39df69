"""TensorRT 10 engine builder for the `onnx` target (optional extra: `pip install dscompress[tensorrt]`).

Strongly typed network from the ONNX file (the Q/DQ nodes fix every precision, so no precision flags), one
optimization profile over batch, sequence and past length from the recipe's target, a timing cache, the workspace
limit and the builder optimization level; the serialized engine plus a JSON sidecar (TensorRT version, device,
profiles, hashes). The engine runs through `bundle_runner.TrtBackend` (execute_async_v3 with the KV cache).

TensorRT is not installable on our CI or development machines (its PyPI package downloads from NVIDIA's index),
so this module has not been run here; it is written against the TensorRT 10 Python API and reports plainly where
TensorRT is missing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from dscompress.errors import DscompressError


class TensorRTMissing(DscompressError):
    """TensorRT is not importable here (exit 2)."""


def require_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise TensorRTMissing(
            "TensorRT is not installed here: engines are built on the target (JetPack ships TensorRT; on x86 "
            "`pip install dscompress[tensorrt]` with NVIDIA's index). Use the bundle's build_engine.sh on the device"
        ) from None
    return tensorrt


@dataclass(frozen=True)
class Profile:
    """min / opt / max of batch, new tokens per call and cached tokens."""

    batch: tuple[int, int, int]
    sequence: tuple[int, int, int]
    past: tuple[int, int, int]

    @classmethod
    def from_target(cls, target) -> Profile:
        """Tuned for decode (one new token) after `opt_context` cached ones; past + sequence <= max_context."""
        return cls(
            (1, 1, target.max_batch), (1, 1, target.max_context), (0, target.opt_context, target.max_context - 1)
        )

    def shapes(self, export_meta: dict) -> dict[str, tuple[tuple[int, ...], ...]]:
        """Input name -> (min, opt, max) shapes for every input of the exported graph."""
        layout = export_meta["layout"]
        total = (1, self.past[1] + self.sequence[1], self.sequence[2])  # the mask covers past + new tokens
        result = {}
        for k in range(3):
            b, s, p = self.batch[k], self.sequence[k], self.past[k]
            result.setdefault("input_ids", []).append((b, s))
            result.setdefault("position_ids", []).append((b, s))
            result.setdefault("attention_mask", []).append((b, total[k]))
            for i in range(layout["layers"]):
                result.setdefault(f"past.{i}.key", []).append((b, layout["key"][0], p, layout["key"][1]))
                result.setdefault(f"past.{i}.value", []).append((b, layout["value"][0], p, layout["value"][1]))
        return {name: tuple(v) for name, v in result.items()}


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    profile: Profile,
    workspace_mib: int,
    opt_level: int,
    timing_cache: Path | None = None,
) -> dict:
    """Parse, build and serialize; returns the sidecar written next to the engine."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise DscompressError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    config.builder_optimization_level = opt_level
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache and timing_cache.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    meta = json.loads((onnx_path.parent / "export.json").read_text())
    opt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.shapes(meta).items():
        opt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(opt_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise DscompressError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    engine_path.write_bytes(bytes(serialized))
    if timing_cache is not None:
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    sidecar = {
        "tensorrt": trt.__version__,
        "device": _device_name(),
        "profile": profile.__dict__,
        "workspace_mib": workspace_mib,
        "builder_optimization_level": opt_level,
        "onnx_sha256": _sha256(onnx_path),
        "engine_sha256": _sha256(engine_path),
    }
    engine_path.with_suffix(".json").write_text(json.dumps(sidecar, indent=2) + "\n")
    return sidecar


def _device_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "unknown"
    except ImportError:
        return "unknown"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
