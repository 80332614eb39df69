"""Where models come from: local safetensors checkpoints, GGUF files, the bundled SmolLM2, tiny test models.

Everything resolves to a local Hugging Face checkpoint directory holding safetensors weights. GGUF files (the
bundled model included) are dequantized through transformers once and cached as safetensors. Pickle weights are
never loaded, and remote code runs only when the recipe sets `trust_remote_code: true`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from dscompress.atomic import TMP_PREFIX, atomic_dir, sha256_file, sha256_json
from dscompress.errors import ModelSourceError
from dscompress.models.bundled import BUNDLED, assemble
from dscompress.models.fp8 import fp8_config
from dscompress.models.load import read_config_json
from dscompress.models.packed import import_quantized
from dscompress.models.stream import Shards
from dscompress.models.tiny import TINY_ARCHS, write_tiny

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def cache_root() -> Path:
    """$DSCOMPRESS_CACHE, else ~/.cache/dscompress."""
    return Path(os.environ.get("DSCOMPRESS_CACHE") or Path.home() / ".cache" / "dscompress")


@dataclass(frozen=True)
class ResolvedModel:
    directory: Path  # a checked HF checkpoint directory with safetensors weights
    origin: str  # what the recipe named


def convert_gguf(gguf: Path, target: Path, on_step=None) -> None:
    """Dequantize a GGUF file through transformers and save it as a safetensors checkpoint (atomically).

    An lm_head that the GGUF stores beside the embeddings but that is the same matrix up to their two
    quantization grids (llama.cpp writes `output.weight` for tied models too) is tied again, to the finer of
    the two copies: the checkpoint then has the original's parameter count and tie.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    step = on_step or (lambda message: None)
    step(f"dequantizing {gguf.name} through transformers (once; cached as safetensors)")
    try:
        with _no_plain_progress_bar():
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:  # gguf raises many types for bad files; all mean the same to a user
        raise ModelSourceError(f"{gguf}: cannot read GGUF file ({type(exc).__name__}: {exc})") from exc
    # save_pretrained refuses GGUF-quantized models; the weights are already dequantized floats.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if (finer := duplicated_head(gguf)) is not None:
        retie(model, finer)
        step(f"lm_head is the embedding matrix on another grid: tied again (kept the {finer} copy)")
    step(f"writing {target.name}")
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


# GGUF tensor types from coarse to fine: the copy on the finer grid is closer to the original matrix.
_GRID_ORDER = ("Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0", "F16", "BF16", "F32")


def duplicated_head(gguf: Path, tolerance: float = 0.1) -> str | None:
    """'output' or 'embedding' when the GGUF's output.weight and token_embd.weight are one matrix on two grids
    (mean |difference| below `tolerance` of mean |weight|): the copy to keep. None otherwise."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    tensors = {t.name: t for t in GGUFReader(str(gguf)).tensors}
    head, embed = tensors.get("output.weight"), tensors.get("token_embd.weight")
    if head is None or embed is None or tuple(head.shape) != tuple(embed.shape):
        return None
    a, b = (dequantize(t.data, t.tensor_type) for t in (head, embed))
    if float(abs(a - b).mean()) > tolerance * float(abs(a).mean()):
        return None
    rank = {name: i for i, name in enumerate(_GRID_ORDER)}
    finer_head = rank.get(head.tensor_type.name, 0) >= rank.get(embed.tensor_type.name, 0)
    return "output" if finer_head else "embedding"


def retie(model, keep: str) -> None:
    """Tie lm_head to the input embeddings, keeping the weights of `keep` ('output' or 'embedding')."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    with torch.no_grad():
        if keep == "output":
            embed.weight.copy_(head.weight)
    model.config.tie_word_embeddings = True
    model.config.get_text_config().tie_word_embeddings = True
    head.weight = embed.weight


@contextlib.contextmanager
def _no_plain_progress_bar():
    """transformers' GGUF loader draws its own tqdm bar outside our display; our step lines say the same."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original = gguf_utils.tqdm
    gguf_utils.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        gguf_utils.tqdm = original


SEAL = ".dscompress-cache.json"  # {file: [size, mtime_ns, sha256]} of a finished cache entry


def seal(entry: Path) -> None:
    """Record a finished cache entry's files and make them read-only. Stage folders hard-link these files, so the
    permissions stop other users' writes; the seal catches the rest (`intact`)."""
    record = {}
    for f in sorted(entry.iterdir()):
        if f.is_file() and not f.name.startswith("."):
            f.chmod(0o444)
            st = f.stat()
            record[f.name] = [st.st_size, st.st_mtime_ns, sha256_file(f)]
    (entry / SEAL).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def intact(entry: Path, on_step=None) -> bool:
    """Whether a cache entry still holds what was sealed: a file whose size or modification time changed is
    hashed again; a missing seal is written now (entries made before seals existed)."""
    try:
        record = json.loads((entry / SEAL).read_text())
    except FileNotFoundError:
        seal(entry)
        return True
    except (OSError, ValueError):
        return False
    files = {f.name for f in entry.iterdir() if f.is_file() and not f.name.startswith(".")}
    if files != set(record):
        return False
    for name, (size, mtime_ns, digest) in record.items():
        st = (entry / name).stat()
        if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
            if on_step:
                on_step(f"{entry.name}/{name} changed since it was cached: checking its hash")
            if sha256_file(entry / name) != digest:
                return False
    return True


@contextlib.contextmanager
def entry_lock(target: Path, on_step=None):
    """Hold the cache entry's lock file: two processes asking for the same model (a CI matrix sharing one cache,
    a second terminal) build it once, the second waiting, instead of both writing the same temporary files."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fh = open(target.with_name(f".{target.name}.lock"), "a")  # noqa: SIM115 (entered just below)
    except OSError:  # a read-only shared cache: nothing can be built there, so there is nothing to serialise
        yield
        return
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_step:
                on_step(f"{target.name}: another process is preparing it; waiting")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _cached(target: Path, build, on_step=None) -> Path:
    """A cache entry built once by `build(target)`, sealed, and rebuilt if its files were changed since (a
    stage folder's hard link written through, a stray edit): the cache never hands out modified weights."""
    with entry_lock(target, on_step):
        if target.exists() and not intact(target, on_step):
            (on_step or (lambda m: None))(f"{target.name}: the cached files were modified; rebuilding them")
            doomed = target.with_name(f"{TMP_PREFIX}stale-{target.name}.{os.getpid()}")
            os.replace(target, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        if not target.exists():
            build(target)
            seal(target)
    return target


def resolve(path: str, on_step=None, keep_fp8: bool = False) -> ResolvedModel:
    """Turn a recipe's `model.path` into a checked local checkpoint directory, converting once if needed.
    `on_step(message)` hears about the slow one-time steps (assembling, verifying, dequantizing, writing).
    `keep_fp8` (model.stream): an FP8 block-scaled checkpoint is checked from its headers and read as it is,
    dequantized layer by layer when read, instead of converted to a bf16 copy."""
    if path.startswith("bundled:"):
        name = path.removeprefix("bundled:")
        if name not in BUNDLED:
            raise ModelSourceError(f"unknown bundled model {name!r}; available: {', '.join(BUNDLED)}")

        def build(target: Path) -> None:
            gguf = assemble(BUNDLED[name], cache_root() / "models" / f"{TMP_PREFIX}gguf-{name}", on_step)
            convert_gguf(gguf, target, on_step)
            if gguf.parent.name.startswith(TMP_PREFIX):
                shutil.rmtree(gguf.parent, ignore_errors=True)

        return ResolvedModel(check_checkpoint_dir(_cached(cache_root() / "models" / name, build, on_step)), path)
    if path.startswith("tiny:"):
        arch = path.removeprefix("tiny:")
        if arch not in TINY_ARCHS:
            raise ModelSourceError(f"unknown tiny model {arch!r}; available: {', '.join(TINY_ARCHS)}")

        def build(target: Path) -> None:
            with atomic_dir(target) as tmp:
                write_tiny(arch, tmp)

        return ResolvedModel(
            check_checkpoint_dir(_cached(cache_root() / "models" / f"tiny-{arch}", build, on_step)), path
        )
    local = Path(path).expanduser()
    if not local.exists() and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", path):
        raise ModelSourceError(
            f"{path}: no such local path; if it is a Hugging Face hub id: dscompress never downloads. Fix: on "
            f"a connected machine run `huggingface-cli download {path} --local-dir DIR`, bring DIR here and set "
            "model.path to it (or use bundled:<name>, see `dscompress models`)"
        )
    if not local.exists():
        raise ModelSourceError(
            f"{path}: model path not found. Fix: give a checkpoint directory, a .gguf file, "
            "'bundled:<name>' or 'tiny:<arch>' (see `dscompress models`)"
        )
    if local.is_file() and local.suffix == ".gguf":
        target = cache_root() / "models" / f"gguf-{sha256_file(local)[:16]}"
        _cached(target, lambda t: convert_gguf(local, t, on_step), on_step)
        return ResolvedModel(check_checkpoint_dir(target), path)
    if local.is_file():
        raise ModelSourceError(
            f"{path}: is a file; dscompress reads checkpoint directories (safetensors) or .gguf files"
        )
    check_checkpoint_dir(local)
    config = read_config_json(local)
    if keep_fp8 and fp8_config(config):
        Shards(local)  # the FP8 layout's refusals (scales missing or misshapen), from the headers
        return ResolvedModel(local, path)
    if config.get("quantization_config"):
        return ResolvedModel(check_checkpoint_dir(import_packed(local)), path)
    return ResolvedModel(local, path)


def import_packed(directory: Path) -> Path:
    """A GPTQ / compressed-tensors checkpoint, dequantized once into the cache with its quantization grid."""
    digest = sha256_json({p.name: sha256_file(p) for p in sorted(directory.glob("*")) if p.is_file()})
    return _cached(cache_root() / "models" / f"imported-{digest[:16]}", lambda t: import_quantized(directory, t))


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
    read_config_json(directory)
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
