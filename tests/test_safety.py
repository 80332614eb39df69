"""Never lose or corrupt a user's data (issue #24): folders dscompress did not create, the source checkpoint and
the shared model cache, incomplete checkpoints, hostile recipes, Ctrl-C, a full disk, interrupted cleanups.
Each case asserts the exit code, the one-line message, and that every file it did not write is untouched."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, cli, cli_here, tiny_recipe, write_recipe

import dscompress
from dscompress.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under `directory` (hidden ones included) -> sha256."""
    return {
        p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def foreign_folder(path: Path) -> dict[str, str]:
    """A folder of the user's own files, named like things we write, to make the temptation real."""
    path.mkdir(parents=True)
    (path / ".tmp-draft.txt").write_text("my notes")
    (path / "report.md").write_text("my report")
    (path / "model.onnx").write_bytes(b"not ours")
    return snapshot(path)


def one_line_error(result, *needles: str) -> None:
    """The failure is one `error:` line, the last one (timestamped progress lines may come before it)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.fixture(scope="module")
def stage(tmp_path_factory) -> Path:
    """A finished tiny RTN stage to export and bundle from."""
    tmp = tmp_path_factory.mktemp("stage")
    dscompress.run(tiny_recipe(tmp / "r.yaml"), tmp / "out")
    return tmp / "out" / "latest"


# ---- output folders ------------------------------------------------------------------------------------------
def test_run_refuses_a_folder_it_did_not_create_and_touches_nothing(tmp_path):
    out = tmp_path / "mine"
    before = foreign_folder(out)
    result = cli_here("run", str(tiny_recipe(tmp_path / "r.yaml")), "--out", str(out))
    assert result.returncode == EXIT_BAD_INPUT
    one_line_error(result, "already holds files dscompress did not write", ".tmp-draft.txt", "Fix:")
    assert snapshot(out) == before


def test_run_into_its_own_folder_again_keeps_a_users_temporary_looking_file(tmp_path):
    recipe, out = tiny_recipe(tmp_path / "r.yaml"), tmp_path / "out"
    dscompress.run(recipe, out)
    (out / ".tmp-draft.txt").write_text("mine")  # looks like ours, is not: no .<pid> suffix
    dscompress.run(recipe, out)
    assert (out / ".tmp-draft.txt").read_text() == "mine"


@pytest.mark.parametrize("command", ["export", "bundle"])
def test_export_and_bundle_refuse_foreign_folders_and_files_before_any_work(tmp_path, stage, command):
    extra = ["--format", "onnx"] if command == "export" else ["--target", "x86-gpu"]
    folder = tmp_path / "mine"
    before = foreign_folder(folder)
    result = cli_here(command, str(stage), "--out", str(folder), *extra)
    assert result.returncode == EXIT_BAD_INPUT
    one_line_error(result, "did not write", "Fix:")
    assert snapshot(folder) == before
    afile = tmp_path / "a-file"
    afile.write_text("keep me")
    result = cli_here(command, str(stage), "--out", str(afile), *extra)
    assert result.returncode == EXIT_BAD_INPUT
    one_line_error(result, "is a file")
    assert afile.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "mine"]


def test_export_rewrites_its_own_output_atomically(tmp_path, stage):
    out = tmp_path / "packed"
    assert cli_here("export", str(stage), "--format", "gptq", "--out", str(out)).returncode == 0
    first = snapshot(out)
    assert ".dscompress-owner" in first
    assert cli_here("export", str(stage), "--format", "gptq", "--out", str(out)).returncode == 0
    assert snapshot(out) == first  # replaced by the same bytes, not mixed
    assert [p.name for p in tmp_path.iterdir()] == ["packed"]  # no temporaries left beside it


def test_asymmetric_int4_onnx_export_refuses_at_once_and_writes_nothing(tmp_path):
    recipe = tiny_recipe(tmp_path / "r.yaml", stages="  - rtn: {bits: 4, group_size: 32, symmetric: false}")
    dscompress.run(recipe, tmp_path / "out")
    started = time.perf_counter()
    result = cli_here("export", str(tmp_path / "out" / "latest"), "--format", "onnx", "--out", str(tmp_path / "e"))
    assert result.returncode == EXIT_BAD_INPUT and time.perf_counter() - started < 5
    one_line_error(result, "asymmetric INT4", "onnx-ort")
    assert not (tmp_path / "e").exists() and not list(tmp_path.glob(".tmp-*"))


# ---- the source checkpoint and the model cache ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("model", "entry"),
    [("tiny:llama", "tiny-llama"),
     pytest.param("bundled:smollm2-135m-instruct", "smollm2-135m-instruct", marks=pytest.mark.slow)],
)  # fmt: skip
def test_corrupting_a_stage_never_changes_the_cache(tmp_path, model_cache, model, entry):
    out = tmp_path / "out"
    dscompress.run(tiny_recipe(tmp_path / "r.yaml", model=model), out)
    cached = model_cache / "models" / entry
    before = snapshot(cached)
    with open(out / "0-baseline" / "model.safetensors", "r+b") as fh:  # as root, permissions would not stop it
        fh.seek(-8, os.SEEK_END)
        fh.write(b"\xff" * 8)
    assert snapshot(cached) == before


def test_a_modified_cache_entry_is_rebuilt_not_used(tmp_path, model_cache):
    from dscompress.models.sources import resolve

    entry = resolve("tiny:qwen2").directory
    good = snapshot(entry)
    weights = entry / "model.safetensors"
    weights.chmod(0o644)
    with open(weights, "r+b") as fh:  # what a write through a hard link would do
        fh.seek(-8, os.SEEK_END)
        fh.write(b"\x00" * 8)
    steps = []
    assert resolve("tiny:qwen2", on_step=steps.append).directory == entry
    seal = ".dscompress-cache.json"  # records modification times, so it differs; the files it seals do not
    assert {k: v for k, v in snapshot(entry).items() if k != seal} == {k: v for k, v in good.items() if k != seal}
    assert any("modified" in s for s in steps), steps


def test_a_checkpoint_missing_a_tensor_is_refused_naming_it(tmp_path, model_cache):
    import shutil

    from safetensors.torch import load_file, save_file

    from dscompress.models.sources import resolve

    ckpt = tmp_path / "ckpt"
    shutil.copytree(resolve("tiny:qwen2").directory, ckpt)
    tensors = load_file(ckpt / "model.safetensors")
    del tensors["model.layers.0.self_attn.q_proj.bias"]
    (ckpt / "model.safetensors").chmod(0o644)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    result = cli_here("run", str(tiny_recipe(tmp_path / "r.yaml", model=str(ckpt))), "--out", str(tmp_path / "o"))
    assert result.returncode == EXIT_BAD_INPUT
    one_line_error(result, "is missing", "model.layers.0.self_attn.q_proj.bias")
    assert not (tmp_path / "o" / "0-baseline").exists()


# ---- hostile recipes -----------------------------------------------------------------------------------------
def test_billion_laughs_recipe_fails_fast(tmp_path):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]")
    recipe = write_recipe(tmp_path / "r.yaml", "\n".join(lines) + "\nmodel: *i\n")
    started = time.perf_counter()
    result = cli_here("validate", str(recipe))
    assert result.returncode == EXIT_BAD_INPUT and time.perf_counter() - started < 5
    one_line_error(result, "expands to over")


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("model: {path: x}".encode("utf-16"), "not UTF-8"),
        (b"\x00\x01\x02binary", "NUL"),
        (("a: " + "[" * 3000 + "]" * 3000).encode(), "nested"),
    ],
)
def test_recipes_that_are_not_yaml_text_are_one_line(tmp_path, content, needle):
    (tmp_path / "r.yaml").write_bytes(content)
    result = cli_here("validate", str(tmp_path / "r.yaml"))
    assert result.returncode == EXIT_BAD_INPUT
    one_line_error(result, needle)


# ---- interruptions, full disks, cleanups ---------------------------------------------------------------------
def test_ctrl_c_during_the_baseline_exits_130_and_the_rerun_resumes(tmp_path):
    text = tiny_recipe(tmp_path / "t.yaml").read_text()
    text = text.replace("eval: {samples: 4, seq_len: 64}", "eval: {samples: 96, seq_len: 256}")
    recipe = write_recipe(tmp_path / "r.yaml", text.replace("batch_size: 2", "batch_size: 1"))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "dscompress.cli", "run", str(recipe), "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    said = []
    for line in proc.stderr:  # the heartbeat lines: interrupt as the second window is scored (of 96), not
        said.append(line)  # after polling the disk, which a loaded machine can oversleep past the whole baseline
        if "evaluate: 2/96" in line:
            break
    else:
        pytest.fail("the baseline never reported its second window:\n" + "".join(said))
    proc.send_signal(signal.SIGINT)
    stderr = "".join(said) + proc.communicate(timeout=120)[1]
    assert proc.returncode == EXIT_INTERRUPTED, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert not (out / "0-baseline").exists()
    import xml.etree.ElementTree as ET

    suite = ET.parse(out / "junit.xml").getroot()[0]  # exit 130: one error, not zero tests
    assert (suite.get("tests"), suite.get("errors"), suite.get("failures")) == ("1", "1", "0")
    assert cli("run", str(recipe), "--out", str(out)).returncode == 0


@pytest.mark.parametrize(
    ("code", "fix"), [(errno.ENOSPC, "free disk space"), (errno.EACCES, "choose a location you may write to")]
)
def test_a_full_disk_or_unwritable_folder_is_exit_2_with_the_os_reason_and_no_partial_stage(
    tmp_path, monkeypatch, code, fix
):
    """Simulated where the baseline is written (as root, permissions cannot make a folder unwritable here)."""
    import dscompress.runner

    def fails(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(tmp_path / "out" / "0-baseline"))

    monkeypatch.setattr(dscompress.runner, "compute_baseline", fails)
    result = cli_here("run", str(tiny_recipe(tmp_path / "r.yaml")), "--out", str(tmp_path / "out"))
    assert result.returncode == EXIT_BAD_INPUT
    one_line_error(result, os.strerror(code), fix)
    left = {p.name for p in (tmp_path / "out").iterdir()}
    assert left == {".dscompress-owner", ".lock", "junit.xml", "report.json", "report.md", "report.html"}  # no stage


def test_interrupted_resume_cleanup_is_finished_by_the_next_run(tmp_path):
    recipe, out = tiny_recipe(tmp_path / "r.yaml"), tmp_path / "out"
    dscompress.run(recipe, out)
    half_deleted = out / ".resume" / "1-rtn-0123456789abcdef"  # a kill during an old-style rmtree
    (half_deleted / "block-3").mkdir(parents=True)
    renamed = out / ".tmp-resume-1-rtn-fedcba9876543210.999999"  # a kill after the rename, during the delete
    (renamed / "block-0").mkdir(parents=True)
    dscompress.run(recipe, out)
    assert not half_deleted.exists() and not renamed.exists()


def _kill_when(cmd: list[str], parent: Path, pattern: str) -> None:
    """Start `cmd`, SIGKILL it once a file matching `pattern` exists under `parent` (a temporary being written)."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not [p for p in parent.glob(pattern) if p.is_file()] and time.time() < deadline:
        assert proc.poll() is None, "finished before it could be killed"
        time.sleep(0.01)
    proc.kill()
    proc.wait()


@pytest.mark.parametrize(
    ("command", "extra", "pattern"),
    [
        ("export", ["--format", "onnx-ort"], ".tmp-e.*/model.onnx*"),
        ("export", ["--format", "gptq"], ".tmp-e.*/*.safetensors"),
        ("bundle", ["--target", "x86-gpu"], ".tmp-e.*/model.onnx*"),
    ],
)
def test_sigkilled_export_and_bundle_leave_nothing_finished_and_rerun_to_identical_bytes(
    tmp_path, stage, command, extra, pattern
):
    base = [sys.executable, "-m", "dscompress.cli", command, str(stage)]
    clean = tmp_path / "clean"
    clean.mkdir()
    assert subprocess.run([*base, "--out", str(clean / "e"), *extra], cwd=REPO, capture_output=True).returncode == 0
    killed = tmp_path / "killed"
    killed.mkdir()
    _kill_when([*base, "--out", str(killed / "e"), *extra], killed, pattern)
    assert not (killed / "e").exists()  # nothing under the final name: only a temporary
    rerun = subprocess.run([*base, "--out", str(killed / "e"), *extra], cwd=REPO, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert [p.name for p in killed.iterdir()] == ["e"]  # the killed writer's temporary is gone
    assert snapshot(killed / "e") == snapshot(clean / "e")  # byte for byte what an uninterrupted run writes
