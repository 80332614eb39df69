"""What a stage artifact is on disk: its manifest, its hash, the files it carries beside the weights, the
`latest` link, and the lock that keeps two runs out of one output directory."""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from dscompress.atomic import atomic_symlink, read_json, sha256_json, tree_hashes
from dscompress.errors import OutputPathError, RunLocked
from dscompress.quant.qstate import QUANT_JSON, QUANT_TENSORS
from dscompress.version import __version__

MANIFEST = "manifest.json"
BASELINE_FILE = "baseline_logprobs.safetensors"
# Files a stage rewrites itself; everything else in its input (tokenizer, chat template) is linked through.
OWN_FILES = ("config.json", "generation_config.json", MANIFEST, QUANT_JSON, QUANT_TENSORS, BASELINE_FILE)

# What an exported ONNX directory carries beside the graph, for tokenizers and generation settings.
ONNX_SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    "config.json",
)


def copy_side_files(source: Path, target: Path) -> None:
    """Tokenizer, chat template and generation config: what a checkpoint needs besides weights and config."""
    for f in source.iterdir():
        if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens")) or f.suffix == ".jinja"
                            or f.name == "generation_config.json"):  # fmt: skip
            shutil.copy2(f, target / f.name)


class RunLock:
    """An flock on out/.lock: released by the kernel even when the holder is SIGKILLed."""

    def __init__(self, out: Path):
        self.path = out / ".lock"
        self.fh = None

    def __enter__(self):
        self.fh = open(self.path, "a+")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.fh.close()
            raise RunLocked(f"{self.path.parent}: another dscompress run is using this output directory") from None
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(f"{os.getpid()}\n")
        self.fh.flush()
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()


def prepare_output(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"output_dir: {out} is a file. Fix: choose a directory path (or --out)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputPathError(f"output_dir: {out}: cannot create it ({exc.strerror})") from exc


def point_latest(out: Path, target: str) -> None:
    atomic_symlink(out / "latest", target)


def artifact_hash(directory: Path) -> str:
    return sha256_json(tree_hashes(directory, exclude=frozenset({MANIFEST})))


def dir_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def read_manifest(directory: Path) -> dict:
    """A stage's manifest, or {} where the directory has none (a plain checkpoint)."""
    return read_json(directory / MANIFEST) or {}


def reusable(directory: Path, key: str) -> dict | None:
    """The manifest of a finished stage whose key matches and whose files still hash to what it recorded."""
    manifest = read_json(directory / MANIFEST)
    if manifest and manifest.get("key") == key and artifact_hash(directory) == manifest.get("artifact_hash"):
        return manifest
    return None


def resume_dir(out: Path, stage_dir: str, key: str) -> Path:
    """out/.resume/<stage>-<key>: partial work a pass may checkpoint; other keys' leftovers are deleted."""
    root = out / ".resume"
    current = root / f"{stage_dir}-{key[:16]}"
    for stale in root.glob(f"{stage_dir}-*"):
        if stale != current:
            shutil.rmtree(stale, ignore_errors=True)
    current.mkdir(parents=True, exist_ok=True)
    return current


def versions() -> dict:
    """The versions that made an artifact, recorded in its manifest and the report."""
    import platform

    import safetensors
    import torch
    import transformers

    return {
        "dscompress": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
    }
