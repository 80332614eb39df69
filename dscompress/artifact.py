"""What a stage artifact is on disk: its manifest, its hash, the files it carries beside the weights, the
`latest` link, and the lock that keeps two runs out of one output directory."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from dscompress.atomic import (
    TMP_PREFIX,
    atomic_dir,
    atomic_symlink,
    atomic_write_json,
    is_our_temporary,
    read_json,
    remove_stale_temporaries,
    sha256_json,
    tree_hashes,
)
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


OWNER_FILE = ".dscompress-owner"  # {"kind": "run" | "export" | "bundle"}: this directory is ours to rewrite
# Directories written before the owner file existed, recognised by what only dscompress puts there.
_LEGACY_MARKS = {"run": (".lock",), "export": ("export.json", "quantize_config.json"), "bundle": ("verify.sh",)}
_NAME_MAX = 255


def check_output(out: Path, kind: str) -> None:
    """Refuse, before any work, an output path dscompress may not write: a file, a name too long for the file
    system, or an existing directory holding files that dscompress did not write (a new or empty directory, or
    one carrying our owner file, is fine). Nothing is created here."""
    fix = "Fix: choose a new or empty directory (or --out)"
    if any(len(part.encode()) > _NAME_MAX for part in out.parts):
        raise OutputPathError(f"{kind} output {str(out)[:60]}...: a path component is over {_NAME_MAX} bytes. {fix}")
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"{kind} output {out}: is a file, which dscompress never replaces. {fix}")
    if not out.is_dir():
        return
    entries = sorted(p.name for p in out.iterdir() if not is_our_temporary(p.name))
    owner = read_json(out / OWNER_FILE)
    if owner is not None:
        if owner.get("kind") != kind:
            raise OutputPathError(f"{kind} output {out}: holds a dscompress {owner.get('kind')}, not a {kind}. {fix}")
        return
    if entries and not any(mark in entries for mark in _LEGACY_MARKS[kind]):
        shown = ", ".join(entries[:3]) + (f" (+{len(entries) - 3} more)" if len(entries) > 3 else "")
        raise OutputPathError(
            f"{kind} output {out}: already holds files dscompress did not write ({shown}); it writes only into a "
            f"new or empty directory, or one it created, and never deletes others' files. {fix}"
        )


def mark_owned(directory: Path, kind: str) -> None:
    atomic_write_json(directory / OWNER_FILE, {"kind": kind, "dscompress": __version__})


def claim_output(out: Path, kind: str) -> None:
    """A run's output directory: checked (`check_output`), created, and marked as ours."""
    check_output(out, kind)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not (out / OWNER_FILE).exists():
            mark_owned(out, kind)
    except OSError as exc:
        raise OutputPathError(f"{kind} output {out}: cannot write there ({exc.strerror})") from exc


@contextlib.contextmanager
def owned_dir(out: Path, kind: str) -> Iterator[Path]:
    """An export or bundle directory, written whole or not at all: checked first, built under a temporary name
    beside it, marked as ours and renamed into place on success (replacing only an earlier output of ours).
    Leftovers of killed writers of the same target are removed first."""
    check_output(out, kind)
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputPathError(f"{kind} output {out}: cannot create {parent} ({exc.strerror})") from exc
    remove_stale_temporaries(parent, out.name)
    with atomic_dir(out) as tmp:
        yield tmp
        mark_owned(tmp, kind)


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
    current = out / ".resume" / f"{stage_dir}-{key[:16]}"
    discard_resume(out, stage_dir, keep=current)
    current.mkdir(parents=True, exist_ok=True)
    return current


def discard_resume(out: Path, stage_dir: str, keep: Path | None = None) -> None:
    """Delete a stage's partial work, each folder first renamed to a `.tmp-` name in `out` (one atomic step), so
    a kill during the deletion leaves a temporary that the next run removes, never a half-deleted `.resume/`
    folder that looks like resumable work."""
    for stale in (out / ".resume").glob(f"{stage_dir}-*"):
        if stale != keep:
            doomed = out / f"{TMP_PREFIX}resume-{stale.name}.{os.getpid()}"
            os.replace(stale, doomed)
            shutil.rmtree(doomed, ignore_errors=True)


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
