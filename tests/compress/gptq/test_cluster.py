"""Joining an outside launcher's process group (compress/cluster.py): `torchrun -m dscompress.cli run` with 2
gloo processes on the CPU, the way a user spreads one recipe over several hosts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import REPO, cli, tiny_recipe
from safetensors.torch import load_file

from dscompress.compress.workers import free_port

STAGES = "  - gptq: {{bits: 4, group_size: 32, devices: {devices}}}\n    gate: {{kl: {{max: 1.0}}}}"


def torchrun(*args: str, nproc: int = 2, log_dir: Path | None = None) -> subprocess.CompletedProcess:
    logs = [f"--log-dir={log_dir}"] if log_dir else []  # a user's launcher: its logs where the test says
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", *logs, "-m", "dscompress.cli", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


def test_a_torchrun_launched_run_joins_the_group_and_equals_devices_2(tmp_path):
    """Two ranks started by torchrun run the recipe once (rank 0 writes everything) with GPTQ spread over both:
    the same data-parallel pass as `devices: 2`, which spawns its own two workers, so the same weights."""
    arch = "deepseek_v3"  # a dense first layer (rows split) and routed experts (experts split)
    launched = torchrun("run", str(tiny_recipe(tmp_path / "a.yaml", f"tiny:{arch}", STAGES.format(devices=1))),
                        "--out", str(tmp_path / "launched"), log_dir=tmp_path / "logs")  # fmt: skip
    assert launched.returncode == 0, launched.stderr[-3000:]
    inner = cli("run", str(tiny_recipe(tmp_path / "b.yaml", f"tiny:{arch}", STAGES.format(devices=2))), "--out",
                str(tmp_path / "inner"))  # fmt: skip
    assert inner.returncode == 0, inner.stderr
    summaries = [json.loads((tmp_path / d / "1-gptq" / "manifest.json").read_text())["summary"]
                 for d in ("launched", "inner")]  # fmt: skip
    assert summaries[0]["devices"] == summaries[1]["devices"] == 2
    a, b = (load_file(tmp_path / d / "1-gptq" / "model.safetensors") for d in ("launched", "inner"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "launched" / "1-gptq" / "workers").exists()
    assert launched.stdout.count("final artifact:") == 1  # rank 0 alone reports


def test_passes_that_cannot_spread_over_the_launchers_ranks_say_so(tmp_path):
    stages = "  - distill: {budget: {tokens: 512}, devices: 2}"
    result = torchrun("run", str(tiny_recipe(tmp_path / "r.yaml", stages=stages)), "--out", str(tmp_path / "o"),
                      log_dir=tmp_path / "logs")  # fmt: skip
    assert result.returncode != 0
    assert "outside launcher (torchrun)" in result.stderr and "Fix: devices: 1" in result.stderr
