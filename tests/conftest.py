"""Shared fixtures. The model cache lives in one temporary directory per test session (per worker under
pytest-xdist), so tests never touch ~/.cache and the bundled model is converted at most once per session."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # `make test`'s workers split the cores instead of each taking all
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))  # torch, here and in every CLI subprocess


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test`), the files with the most real-model (`slow`) tests go first: a worker per
    file, so the longest files start at once instead of ending the run on one worker while the other idles. The
    sort is stable: each file's tests stay together and in order, and every worker computes the same order."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    weight: dict = {}
    for item in items:
        weight[item.path] = weight.get(item.path, 0) + (item.get_closest_marker("slow") is not None)
    items.sort(key=lambda item: -weight[item.path])


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("dscompress-cache")
    old = os.environ.get("DSCOMPRESS_CACHE")
    os.environ["DSCOMPRESS_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("DSCOMPRESS_CACHE", None)
    else:
        os.environ["DSCOMPRESS_CACHE"] = old


@pytest.fixture(autouse=True)
def no_litter():
    """Fail any test that leaves files in the repository (outputs belong in tmp_path)."""
    before = _untracked()
    yield
    added = _untracked() - before
    assert not added, f"test left files in the repo: {sorted(added)}"


def _untracked() -> set[str]:
    result = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all", "--ignored"],
        cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    return {line[3:] for line in result.stdout.splitlines() if "out/" in line[3:] or line[3:].startswith("out")}


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real `dscompress` entry point in a subprocess (exit codes and stderr as a user sees them)."""
    return subprocess.run(
        [sys.executable, "-m", "dscompress.cli", *args],
        cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout, env=os.environ.copy(),
    )  # fmt: skip


def cli_here(*args: str) -> subprocess.CompletedProcess:
    """The same `dscompress` app in this process (typer's test runner): for the many bad-input cases that stop
    before any compute, so each pays no fresh import of torch and transformers (about 6 s on 2 cores)."""
    from typer.testing import CliRunner

    from dscompress.cli import app

    result = CliRunner().invoke(app, list(args))
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, result.stderr)


TINY_RECIPE = """
model: {{path: "{model}"}}
data:
  eval: {{samples: 4, seq_len: 64}}
  calibration: {{samples: 4, seq_len: 64}}
  train: {{samples: 4, seq_len: 64}}
  batch_size: 2
stages:
{stages}
"""


def tiny_recipe(path: Path, model: str = "tiny:llama", stages: str | None = None) -> Path:
    stages = stages or "  - rtn: {bits: 4, group_size: 32}\n    gate: {kl: {max: 1.0}}"
    return write_recipe(path, TINY_RECIPE.format(model=model, stages=stages))


def run_and_sigkill(recipe: Path, out: Path, when: str) -> None:
    """Start `dscompress run`, SIGKILL it as soon as a path matching the glob `when` appears under `out`."""
    cmd = [sys.executable, "-m", "dscompress.cli", "run", str(recipe), "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.time() + 300
    while not list(out.glob(when)) and time.time() < deadline:
        assert proc.poll() is None, f"run ended before {when} appeared"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
