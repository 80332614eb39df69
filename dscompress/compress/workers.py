"""Passes that run on several devices: one worker process per device under torch.distributed.run.

Used by distillation (DDP through accelerate) and GPTQ (data-parallel calibration, split solves). The launching
process writes a job file, starts `python -m torch.distributed.run --nproc_per_node=N -m <worker> job.json`, shows
the progress rank 0 writes to progress.json, and reads the results back once every worker has exited. On CPU the
workers talk through gloo, on GPUs through NCCL (NVLink multicast off).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

from dscompress.atomic import atomic_write_text
from dscompress.compress.cluster import WORKER_ENV, launched
from dscompress.errors import RecipeError


class WorkerJob(BaseModel):
    """The job file a launching process writes for its workers: typed, validated on both sides, written
    atomically. Each pass that runs workers subclasses it with its own fields."""

    model_config = ConfigDict(extra="forbid")
    device: Literal["cpu", "cuda"]
    seed: int
    dtype: str

    def write(self, path: Path) -> Path:
        atomic_write_text(path, self.model_dump_json())
        return path

    @classmethod
    def read(cls, path: Path):
        return cls.model_validate_json(path.read_text())


def world_size(devices: int | str, device: torch.device, stage: str) -> int:
    """How many worker processes a pass asks for: `devices` from its config, `auto` = every visible GPU."""
    if launched() and devices != 1:
        raise RecipeError(
            f"{stage}.devices: {devices}, but this run was started by an outside launcher (torchrun), where "
            f"{stage} runs on rank 0 alone (gptq uses every rank). Fix: devices: 1"
        )
    if devices == "auto":
        return torch.cuda.device_count() if device.type == "cuda" else 1
    if device.type == "cuda" and devices > torch.cuda.device_count():
        raise RecipeError(f"{stage}.devices: {devices} but {torch.cuda.device_count()} GPUs are visible. "
                          "Fix: lower devices or use auto")  # fmt: skip
    return int(devices)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(module: str, job: Path, world: int, on_progress: Callable[[dict], None], threads: int = 1) -> None:
    """Run `module` on `job` in `world` processes; raises with the log's last line when a worker fails.

    `threads`: intra-op threads per worker (CPU workers share the cores; a GPU worker needs few).
    """
    wdir = job.parent
    (wdir / "progress.json").unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={world}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        # the elastic agent's logs go with the job (its default is a new /tmp/torchelastic_* folder per run, never
        # removed); the job folder is removed with the stage's scratch or resume folder
        f"--log-dir={wdir / 'elastic'}",
        "-m",
        module,
        str(job),
    ]
    env = {**os.environ, WORKER_ENV: "1", "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
           "NVSHMEM_DISABLE_NVLS": "1",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}  # fmt: skip
    with open(wdir / "workers.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:
            if (wdir / "progress.json").is_file():
                with contextlib.suppress(json.JSONDecodeError, OSError):
                    on_progress(json.loads((wdir / "progress.json").read_text()))
            time.sleep(0.5)
    if proc.returncode != 0:
        errors = [ln for ln in (wdir / "workers.log").read_text().splitlines() if "Error" in ln or "error" in ln]
        last = errors[-1].strip() if errors else "no error line"
        raise RuntimeError(f"{module} workers exited with {proc.returncode}: {last}; see {wdir / 'workers.log'}")
