"""Every command, every class of bad input (issue #23): one `error:` line, exit 2, nothing written.

Classes: the file system (missing paths, a file where a folder belongs, a name too long), encodings (a
config.json or tokenizer that is not what it claims), formats (truncated or pickle-only weights, a missing
tensor), numbers (NaN weights, empty prompts, zero counts) and semantics (a hub id given as a path: never fetched).
The checkpoints are the tiny Llama, broken one way each."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import cli_here, tiny_recipe
from safetensors.torch import load_file, save_file

from dscompress.errors import EXIT_BAD_INPUT
from dscompress.models.sources import resolve


def _weights(ck: Path, edit) -> None:
    tensors = load_file(ck / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(ck / "model.safetensors"), metadata={"format": "pt"})


def _nan(tensors: dict) -> None:
    tensors["model.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")


def _drop(tensors: dict) -> None:
    del tensors["model.layers.1.self_attn.k_proj.weight"]


BROKEN = {  # kind -> (how to break a copy of tiny:llama, what the error line must say)
    "config not JSON": (lambda ck: (ck / "config.json").write_text("{not json"), "not valid JSON"),
    "config UTF-16": (lambda ck: (ck / "config.json").write_bytes('{"a": 1}'.encode("utf-16")), "not valid JSON"),
    "tokenizer broken": (lambda ck: (ck / "tokenizer.json").write_text("garbage"), "cannot load its tokenizer"),
    "truncated weights": (lambda ck: (ck / "model.safetensors").write_bytes(b"\x10\x00" * 20), "safetensors"),
    "pickle only": (
        lambda ck: ((ck / "model.safetensors").unlink(), (ck / "pytorch_model.bin").write_bytes(b"x")),
        "pickle",
    ),
    "missing tensor": (lambda ck: _weights(ck, _drop), "k_proj.weight"),
    "NaN weights": (lambda ck: _weights(ck, _nan), "NaN/Inf"),
}
NEEDS_WEIGHTS = {"missing tensor", "NaN weights"}  # found when the weights are loaded, not by validate/plan


@pytest.fixture
def broken(tmp_path, request) -> tuple[Path, str]:
    kind = request.param
    ck = tmp_path / "ck"
    shutil.copytree(resolve("tiny:llama").directory, ck, ignore=shutil.ignore_patterns(".*"))
    for f in ck.iterdir():
        f.chmod(0o644)
    BROKEN[kind][0](ck)
    return ck, BROKEN[kind][1]


def assert_refused(result, needle: str, out: Path | None = None) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert result.returncode == EXIT_BAD_INPUT, result.stderr
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in result.stderr, result.stderr
    assert needle in errors[0], errors[0]
    if out is not None:
        assert not out.exists() or not any(p.name.endswith(".safetensors") for p in out.rglob("*")), list(
            out.rglob("*")
        )


# ---- broken checkpoints, through every command that reads one ----------------------------------------------
@pytest.mark.parametrize("broken", list(BROKEN), indirect=True)
def test_eval_refuses_broken_checkpoints(broken):
    ck, needle = broken
    assert_refused(cli_here("eval", str(ck), "--samples", "2", "--seq-len", "32"), needle)


@pytest.mark.parametrize("broken", list(BROKEN), indirect=True)
def test_generate_refuses_broken_checkpoints(broken):
    ck, needle = broken
    assert_refused(cli_here("generate", "--model", str(ck), "--max-new-tokens", "2"), needle)


@pytest.mark.parametrize("broken", [k for k in BROKEN if k != "tokenizer broken"], indirect=True)
def test_bench_refuses_broken_checkpoints(broken):
    ck, needle = broken  # bench feeds fixed token ids: it never needs the tokenizer
    assert_refused(cli_here("bench", str(ck), "--new-tokens", "2", "--repeats", "1"), needle)


@pytest.mark.parametrize("broken", list(BROKEN), indirect=True)
def test_run_refuses_broken_checkpoints_and_writes_no_stage(broken, tmp_path):
    ck, needle = broken
    out = tmp_path / "out"
    assert_refused(
        cli_here("run", str(tiny_recipe(tmp_path / "r.yaml", model=str(ck))), "--out", str(out)), needle, out
    )


@pytest.mark.parametrize("broken", [k for k in BROKEN if k not in NEEDS_WEIGHTS], indirect=True)
@pytest.mark.parametrize("command", ["validate", "plan"])
def test_validate_and_plan_refuse_broken_checkpoints(broken, tmp_path, command):
    ck, needle = broken
    assert_refused(cli_here(command, str(tiny_recipe(tmp_path / "r.yaml", model=str(ck)))), needle)


@pytest.mark.parametrize("broken", [k for k in BROKEN if k != "tokenizer broken"], indirect=True)
def test_export_refuses_broken_stages_and_writes_nothing(broken, tmp_path):
    ck, needle = broken  # an ONNX export copies the tokenizer files but never reads them
    out = tmp_path / "e"
    assert_refused(cli_here("export", str(ck), "--format", "onnx-ort", "--out", str(out)), needle, out)
    assert not out.exists()


@pytest.mark.parametrize("broken", list(BROKEN), indirect=True)
def test_bundle_refuses_broken_stages_and_writes_nothing(broken, tmp_path):
    ck, needle = broken
    out = tmp_path / "b"
    assert_refused(cli_here("bundle", str(ck), "--target", "x86-gpu", "--out", str(out)), needle, out)
    assert not out.exists()


# ---- the file system and semantics ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args",
    [
        ["eval", "{missing}"],
        ["generate", "--model", "{missing}"],
        ["bench", "{missing}"],
        ["export", "{missing}", "--format", "gptq", "--out", "{tmp}/e"],
        ["bundle", "{missing}", "--target", "x86-gpu", "--out", "{tmp}/b"],
        ["eval", "Qwen/Qwen3-0.6B"],  # a hub id: never fetched, named as a missing local path
        ["generate", "--model", "Qwen/Qwen3-0.6B"],
    ],
)
def test_missing_paths_and_hub_ids_are_one_line(tmp_path, args):
    args = [a.format(missing=tmp_path / "no-such", tmp=tmp_path) for a in args]
    result = cli_here(*args)
    assert_refused(result, "")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["generate", "--model", "tiny:llama", "--prompt", ""], "--prompt"),
        (["generate", "--model", "tiny:llama", "--prompt", " \n\t"], "--prompt"),
    ],
)
def test_generate_inputs_are_checked_like_recipe_fields(args, needle):
    assert_refused(cli_here(*args), needle)


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "--model", "tiny:llama", "--max-new-tokens", "0"],
        ["bench", "tiny:llama", "--new-tokens", "1"],
        ["bench", "tiny:llama", "--repeats", "0"],
        ["eval", "tiny:llama", "--samples", "0"],
        ["eval", "tiny:llama", "--seq-len", "-5"],
    ],
)
def test_zero_and_negative_counts_are_refused_before_work(args):
    result = cli_here(*args)
    assert result.returncode == EXIT_BAD_INPUT and "Traceback" not in result.stderr + result.stdout


def test_an_output_path_too_long_for_the_file_system(tmp_path):
    out = tmp_path / ("x" * 300)
    result = cli_here("run", str(tiny_recipe(tmp_path / "r.yaml")), "--out", str(out))
    assert_refused(result, "over 255 bytes")


def test_nan_weights_never_reach_a_gate(tmp_path):
    """Refused when loaded, before the baseline is recorded: no stage runs, nothing claims to have passed."""
    ck = tmp_path / "ck"
    shutil.copytree(resolve("tiny:llama").directory, ck, ignore=shutil.ignore_patterns(".*"))
    for f in ck.iterdir():
        f.chmod(0o644)
    _weights(ck, lambda t: t["model.norm.weight"].fill_(float("inf")))
    out = tmp_path / "out"
    assert_refused(cli_here("run", str(tiny_recipe(tmp_path / "r.yaml", model=str(ck))), "--out", str(out)), "NaN/Inf")
    assert not (out / "latest").exists() and torch.isinf(load_file(ck / "model.safetensors")["model.norm.weight"]).all()


def test_a_hub_id_gets_the_offline_fetch_hint(tmp_path):
    result = cli_here(
        "run", str(tiny_recipe(tmp_path / "r.yaml", model="Qwen/Qwen3-0.6B")), "--out", str(tmp_path / "o")
    )
    assert_refused(result, "huggingface-cli download Qwen/Qwen3-0.6B --local-dir DIR")
    assert not (tmp_path / "o").exists()
