"""A peer's own virtual environment on top of this interpreter's packages (bench scripts).

The venv holds only the peer and what it adds (from PyPI, or from a folder of wheels with no index); through a
.pth file it also sees the site-packages of the interpreter that makes it (torch, transformers), after its own,
so a peer that pins nothing of those costs no second torch download. Packages the venv installs itself win over
the shared ones.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path


def overlay_venv(venv: Path, requirements: list[str] | None = None, wheels: Path | None = None) -> Path:
    """The venv's python, made once: `requirements` from the index (dependencies resolved against the shared
    packages too), or every wheel in `wheels` without an index or dependency resolution."""
    python = venv / "bin" / "python"
    shared = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    pth = next(venv.glob("lib/python3*/site-packages/shared-site-packages.pth"), None)
    if python.exists() and pth is not None and pth.read_text().split() == list(shared):
        return python
    if venv.exists():  # made over another interpreter (a moved or deleted checkout's .venv): its packages are gone
        print(f"{venv} was made over another interpreter's packages; making it again", flush=True)
        shutil.rmtree(venv)
    print(f"creating {venv} (one time)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "shared-site-packages.pth").write_text("\n".join(shared) + "\n")
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-compile"]
    if wheels is not None:
        subprocess.run([*pip, "--no-index", "--no-deps", *map(str, sorted(wheels.glob("*.whl")))], check=True)
    if requirements:
        subprocess.run([*pip, *requirements], check=True)
    return python
