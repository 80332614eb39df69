"""Joining a process group that an outside launcher started, so one recipe runs across several hosts.

`torchrun --nnodes=2 --nproc_per_node=8 --rdzv-endpoint=HOST:PORT -m dscompress.cli run recipe.yaml` (or Slurm
starting torchrun on each node) starts one `dscompress run` per GPU. Instead of spawning workers of its own,
each joins the launcher's group: rank 0 runs the recipe as usual (baseline, gates, reports, artifacts); every
other rank serves. When rank 0 reaches a pass that uses several processes (GPTQ), it broadcasts the job, the
pass runs on every rank with the same data-parallel algorithm as `devices: N` (compress/gptq/dist.py), and the
followers wait for the next job. At the end rank 0 broadcasts a stop. Requirements: every rank sees the stage
directories at the same path (a shared file system), and one GPU per rank (LOCAL_RANK picks it).

The control messages use the default group (NCCL on GPUs, gloo on CPUs) with a long timeout, because followers
wait through the passes rank 0 runs alone (an INT8 calibration can take an hour); a rank that dies ends the
whole group through the launcher.
"""

from __future__ import annotations

import importlib
import os
from datetime import timedelta

import torch

LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
WAIT = timedelta(days=2)  # followers idle through rank 0's single-process stages


WORKER_ENV = "DSCOMPRESS_WORKER"  # set in the workers dscompress spawns itself (compress/workers.py)


def launched() -> bool:
    """Whether this process was started by torchrun (or a compatible launcher) as one of several ranks, rather
    than as one of the workers dscompress starts for `devices: N`."""
    env = os.environ
    return all(k in env for k in LAUNCHER_ENV) and int(env["WORLD_SIZE"]) > 1 and WORKER_ENV not in env


def device() -> torch.device:
    """This rank's device: its LOCAL_RANK's GPU where there are GPUs, else the CPU."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return torch.device("cpu")


def join() -> int:
    """Join the launcher's group on this rank's device; returns the rank."""
    import torch.distributed as dist

    here = device()
    if here.type == "cuda":
        torch.cuda.set_device(here)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if here.type == "cuda" else "gloo", timeout=WAIT)
    return dist.get_rank()


def send(message: dict | None) -> None:
    """Rank 0: hand every other rank a job (`handler` names `module:function`), or None to stop them."""
    import torch.distributed as dist

    dist.broadcast_object_list([message], src=0)


def serve() -> None:
    """Ranks > 0: run each job rank 0 sends until it sends the stop."""
    import torch.distributed as dist

    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            return
        module, _, function = box[0]["handler"].partition(":")
        getattr(importlib.import_module(module), function)(box[0])


def leave(clean: bool) -> None:
    """Rank 0 at the end of its run: stop the followers and leave the group. Not `clean` (a job failed while the
    followers were inside its collectives): send nothing, which would deadlock; exiting ends the group through
    the launcher."""
    import torch.distributed as dist

    if clean and dist.is_initialized():
        send(None)
        dist.destroy_process_group()


def mark_job_failure(exc: BaseException) -> BaseException:
    """Tag an exception raised while every rank was inside a job, for `leave`."""
    exc.during_cluster_job = True
    return exc


def clean_exit(exc: BaseException | None) -> bool:
    return exc is None or not getattr(exc, "during_cluster_job", False)
