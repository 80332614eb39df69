"""Atomic file and directory writes, and content hashes.

A directory that exists under its final name is complete: it is written under a hidden temporary name in the
same parent, fsynced, and renamed in one step. A killed writer leaves only a `.tmp-*` directory, which the next
run deletes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

TMP_PREFIX = ".tmp-"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary directory that becomes `final` only if the block finishes.

    An existing `final` is replaced (moved aside, then removed), so readers never see a mix of old and new.
    """
    tmp = final.with_name(f"{TMP_PREFIX}{final.name}.{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        readable = 0o044 & ~_umask()
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
                mode = f.stat().st_mode & 0o777
                if not mode & 0o077:  # safetensors writes 0600: readable by the serving user like every other file
                    f.chmod(mode | readable)
        if final.exists():
            old = final.with_name(f"{TMP_PREFIX}old-{final.name}.{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_save_safetensors(tensors: dict, path: Path) -> None:
    """safetensors.torch.save_file into a temporary file, renamed over `path` once complete."""
    from safetensors.torch import save_file

    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def atomic_symlink(link: Path, target: str) -> None:
    """Point `link` at `target` in one step: a temporary link renamed over the old one."""
    tmp = link.with_name(f"{TMP_PREFIX}{link.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


def is_our_temporary(name: str) -> bool:
    """`.tmp-<name>.<pid>`: the only names our temporaries take."""
    head, _, pid = name.rpartition(".")
    return name.startswith(TMP_PREFIX) and len(head) > len(TMP_PREFIX) and pid.isdigit()


def ours_and_stale(p: Path) -> bool:
    """Whether `p` is a temporary of ours (`.tmp-<name>.<pid>`) whose writer is no longer running."""
    if not is_our_temporary(p.name):
        return False
    pid = int(p.name.rpartition(".")[2])
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False  # a live process of that pid may still be writing it


def remove_stale_temporaries(parent: Path, name: str = "") -> list[Path]:
    """Delete leftovers of killed writers in `parent` (only names we write: `.tmp-<name>.<pid>` of a process that
    is gone; a user's own `.tmp-notes.txt` is left alone); with `name`, only those of that target.
    Returns what was removed."""
    removed = []
    for p in parent.glob(f"{TMP_PREFIX}*{name}*" if name else f"{TMP_PREFIX}*"):
        if not ours_and_stale(p):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def tree_hashes(directory: Path, exclude: frozenset[str] = frozenset()) -> dict[str, str]:
    """sha256 of every file under `directory` (relative posix path -> hex), minus names in `exclude`."""
    return {
        p.relative_to(directory).as_posix(): sha256_file(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name not in exclude
    }


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link when possible (same filesystem: no extra disk), else copy. Only for files dscompress wrote itself
    (one stage's side files into the next); a source the user handed us goes through `clone_source`."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


FICLONE = 0x40049409  # ioctl: share the blocks copy-on-write (btrfs, XFS, bcachefs); a write never reaches src


def clone_source(src: Path, dst: Path) -> str:
    """Put a source file at `dst` so that writing `dst` can never change `src`: a reflink where the file system
    has them; a hard link where permissions really stop writes (src read-only for everyone, as the model cache's
    sealed files are, and we are not root, whom permissions do not stop); else a copy.
    Returns "reflink", "link" or "copy"."""
    import fcntl

    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        try:
            fcntl.ioctl(fout.fileno(), FICLONE, fin.fileno())
            return "reflink"
        except OSError:
            pass
    dst.unlink()
    if os.geteuid() != 0 and not src.stat().st_mode & 0o222:
        try:
            os.link(src, dst)
            return "link"
        except OSError:
            pass
    shutil.copy2(src, dst)
    dst.chmod(0o644)
    return "copy"


def read_json(path: Path) -> dict | None:
    """A JSON file's object, or None when it is missing or unreadable (a partial write never is: see above)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
