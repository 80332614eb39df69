"""The spine on tiny models of every architecture: stages, artifacts, gates, resume, lock, reports."""

import fcntl
import json
import xml.etree.ElementTree as ET

import pytest
import torch
from conftest import cli, cli_here, tiny_recipe, write_recipe
from transformers import AutoModelForCausalLM, LlamaConfig

import dscompress
from dscompress.errors import EXIT_BAD_INPUT, EXIT_GATE_FAILED, EXIT_LOCKED
from dscompress.models.tiny import TINY_ARCHS
from dscompress.quant.qstate import QuantState
from dscompress.recipe import load_recipe

run_recipe = dscompress.run


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_rtn_stage_on_every_architecture(tmp_path, arch):
    stages = "  - rtn: {bits: 4, group_size: 64, symmetric: false}\n    gate: {kl: {max: 1.0}, top1: {min: 0.5}}"
    report = run_recipe(tiny_recipe(tmp_path / "r.yaml", f"tiny:{arch}", stages), tmp_path / "out")
    assert report["result"] == "passed"
    stage_dir = tmp_path / "out" / "1-rtn"
    assert (tmp_path / "out" / "latest").resolve() == stage_dir.resolve()
    metrics = report["stages"][1]["metrics"]
    assert 0 < metrics["kl"] < 1.0 and metrics["top1"] > 0.5
    # the artifact is a stock checkpoint whose weights sit exactly on the stored grid
    model = AutoModelForCausalLM.from_pretrained(stage_dir)
    quant = QuantState.load(stage_dir)
    assert quant.bits == 4 and quant.group_size == 64 and not quant.symmetric
    kinds = {v["kind"] for v in quant.targets.values()}
    assert kinds == ({"linear", "experts"} if arch in ("qwen3_moe", "deepseek_v3") else {"linear"})
    assert "lm_head" not in quant.targets
    for name, meta in quant.targets.items():
        module_path, attr = (name, "weight") if meta["kind"] == "linear" else name.rsplit(".", 1)
        weight = getattr(model.get_submodule(module_path), attr).detach()
        codes = quant.codes(name, weight)
        scale, zero = quant.tensors[f"{name}.scale"], quant.tensors[f"{name}.zero"]
        rebuilt = (codes.float().reshape(*codes.shape[:-1], -1, 64) - zero.unsqueeze(-1)) * scale.unsqueeze(-1)
        assert torch.equal(rebuilt.reshape(weight.shape), weight), name
    manifest = json.loads((stage_dir / "manifest.json").read_text())
    assert {"key", "input_artifact_hash", "artifact_hash", "metrics", "timings", "versions", "seed"} <= set(manifest)


def test_gate_failure_stops_keeps_previous_and_reports(tmp_path):
    stages = (
        "  - name: int8\n    rtn: {bits: 8, group_size: -1}\n    gate: {kl: {max: 0.5}}\n"
        "  - name: int2\n    rtn: {bits: 2, group_size: 32}\n    gate: {kl: {max: 0.000001}, top1: {min: 0.2}}\n"
        "  - name: never\n    rtn: {bits: 8}\n"
    )
    recipe = tiny_recipe(tmp_path / "r.yaml", stages=stages)
    result = cli("run", str(recipe), "--out", str(tmp_path / "out"))
    assert result.returncode == EXIT_GATE_FAILED, result.stderr
    assert "stage 2-int2 failed its gate: mean KL" in result.stderr and "Traceback" not in result.stderr
    out = tmp_path / "out"
    assert (out / "latest").resolve() == (out / "1-int8").resolve()
    assert not (out / "3-never").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["result"] == "gate failed" and report["final_artifact"].endswith("1-int8")
    failed = [v for v in report["stages"][2]["verdicts"] if not v["passed"]]
    assert [v["metric"] for v in failed] == ["kl"] and failed[0]["threshold"] == 1e-6
    suite = ET.parse(out / "junit.xml").getroot()[0]
    assert suite.get("tests") == "3" and suite.get("failures") == "1"
    assert "mean KL" in suite.find(".//failure").get("message")
    assert "FAIL" in (out / "report.md").read_text()


def test_on_fail_skip_continues_from_previous(tmp_path):
    stages = (
        "  - name: bad\n    rtn: {bits: 2, group_size: 32}\n    gate: {kl: {max: 0.000001}, on_fail: skip}\n"
        "  - name: good\n    rtn: {bits: 8, group_size: -1}\n"
    )
    report = run_recipe(tiny_recipe(tmp_path / "r.yaml", stages=stages), tmp_path / "out")
    assert [s["status"] for s in report["stages"]] == ["passed", "skipped", "passed"]
    suite = ET.parse(tmp_path / "out" / "junit.xml").getroot()[0]  # exit 0, so no failure: a skip
    assert (suite.get("failures"), suite.get("skipped"), suite.get("errors")) == ("0", "1", "0")
    case = suite.find("testcase")
    assert case.get("name") == "1-bad: mean KL <= 1e-06 nats/token" and case.find("skipped") is not None
    assert float(suite.get("time")) == pytest.approx(report["stages"][1]["timings"]["total_s"], abs=2e-3)
    assert suite.get("timestamp") == report["started"]
    manifest = json.loads((tmp_path / "out" / "2-good" / "manifest.json").read_text())
    assert manifest["input"].endswith("0-baseline")


def test_rerun_reuses_and_config_change_recomputes(tmp_path):
    path = tiny_recipe(tmp_path / "r.yaml")
    first = run_recipe(path, tmp_path / "out")
    again = run_recipe(path, tmp_path / "out")
    assert [s["reused"] for s in again["stages"]] == [True, True]
    assert again["stages"][1]["metrics"] == first["stages"][1]["metrics"]
    path.write_text(path.read_text().replace("bits: 4", "bits: 8"))
    changed = run_recipe(path, tmp_path / "out")
    assert [s["reused"] for s in changed["stages"]] == [True, False]


def test_tampered_artifact_is_recomputed(tmp_path):
    path = tiny_recipe(tmp_path / "r.yaml")
    run_recipe(path, tmp_path / "out")
    (tmp_path / "out" / "1-rtn" / "config.json").write_text("{}")
    again = run_recipe(path, tmp_path / "out")
    assert again["stages"][1]["reused"] is False


def test_second_concurrent_run_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        result = cli("run", str(tiny_recipe(tmp_path / "r.yaml")), "--out", str(out))
    assert result.returncode == EXIT_LOCKED and "another dscompress run" in result.stderr


@pytest.mark.parametrize(
    ("recipe_text", "expect"),
    [
        ("output_is_file", "is a file"),
        ("model: {path: /no/such/model}\nstages: [{rtn: {}}]\n", "model path not found"),
        ("model: {path: 'tiny:llama'}\ndata: {eval: {samples: 2, seq_len: 4096}}\nstages: [{rtn: {}}]\n",
         "data.eval.seq_len: 4096 is above the model's maximum of 1024"),
        ("model: {path: 'tiny:llama'}\nstages: [{rtn: {bits: 9}}]\n", "stages[0].rtn.bits: 9 is not allowed"),
        ("model: {path: 'tiny:llama'}\ndata: {eval: {samples: 5000, seq_len: 512}}\nstages: [{rtn: {}}]\n",
         "the corpus is too short"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_with_exit_2_and_writes_nothing(tmp_path, recipe_text, expect):
    out = tmp_path / "out"
    if recipe_text == "output_is_file":
        out.write_text("not a directory")
        recipe_text = "model: {path: 'tiny:llama'}\nstages: [{rtn: {}}]\n"
    result = cli_here("run", str(write_recipe(tmp_path / "r.yaml", recipe_text)), "--out", str(out))
    assert result.returncode == EXIT_BAD_INPUT, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and expect in lines[0] and "Traceback" not in result.stderr, result.stderr
    if out.is_dir():
        assert not any(p.name[0].isdigit() for p in out.iterdir())


def test_group_size_must_divide_widths(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=96, intermediate_size=192, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "m")
    recipe = write_recipe(
        tmp_path / "r.yaml", f"model: {{path: '{tmp_path / 'm'}'}}\nstages:\n  - rtn: {{group_size: 64}}\n"
    )
    result = cli_here("validate", str(recipe))
    assert result.returncode == EXIT_BAD_INPUT
    assert "r.yaml:3: stages[0].rtn.group_size: 64 does not divide in_features 96" in result.stderr
    assert "use one of 32, -1" in result.stderr


def test_debug_shows_traceback(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", "model: {path: /no/such}\nstages: [{rtn: {}}]\n")
    assert "Traceback" in cli("run", str(recipe), "--debug").stderr


def test_stale_temporaries_are_removed(tmp_path):
    out = tmp_path / "out"
    (out / ".tmp-1-rtn.999").mkdir(parents=True)
    (out / ".tmp-1-rtn.999" / "model.safetensors").write_bytes(b"half")
    run_recipe(tiny_recipe(tmp_path / "r.yaml"), out)
    assert not list(out.glob(".tmp-*"))


def test_plan_predicts_params_and_checkpoint_size(tmp_path):
    from dscompress.models.info import inspect_model
    from dscompress.models.sources import resolve
    from dscompress.plan import make_plan

    path = tiny_recipe(tmp_path / "r.yaml", "tiny:qwen3_moe")
    recipe, _ = load_recipe(path)
    plan = make_plan(recipe, inspect_model(resolve(recipe.model.path).directory))
    run_recipe(path, tmp_path / "out")
    stage = tmp_path / "out" / "1-rtn"
    model = AutoModelForCausalLM.from_pretrained(stage)
    assert plan["params"] == sum(p.numel() for p in model.parameters())
    stored = sum((stage / f).stat().st_size for f in ("model.safetensors", "quantization.safetensors"))
    assert abs(plan["stages"][0]["checkpoint_bytes"] - stored) < 0.02 * stored


def test_cli_choices_match_the_library_and_help_lists_exit_codes():
    import typing

    from dscompress import cli as app_module
    from dscompress.export.formats import FORMATS
    from dscompress.export.onnx_quant import TARGETS
    from dscompress.export.targets import JETPACKS
    from dscompress.models.load import DTYPES
    from dscompress.recipe import TargetSpec

    assert (*TARGETS, *FORMATS) == app_module.EXPORT_FORMATS and set(DTYPES) == set(app_module.DTYPE_CHOICES)
    assert typing.get_args(TargetSpec.model_fields["device"].annotation) == app_module.DEVICE_TARGETS
    assert (*app_module.DEVICE_TARGETS, "triton") == app_module.BUNDLE_TARGETS
    assert set(app_module.JETPACKS) == set(JETPACKS)
    for command in ("run", "export", "bundle", "eval", "generate"):
        result = cli(command, "--help")
        text = " ".join(result.stdout.replace("│", " ").split())
        assert "Exit codes: 0 success" in text and "130 interrupted" in text, (command, result.stdout)
    refused = cli_here("export", "x", "--format", "tflite", "--out", "y")
    assert refused.returncode == EXIT_BAD_INPUT and "tflite" in refused.stderr + refused.stdout


def test_json_output_of_validate_models_run_and_export(tmp_path):
    recipe = tiny_recipe(tmp_path / "r.yaml")
    checked = json.loads(cli_here("validate", str(recipe), "--json").stdout)
    assert checked["ok"] and checked["architecture"] == "llama" and checked["notes"] == []
    listed = json.loads(cli_here("models", "--json").stdout)
    assert {"bundled:smollm2-135m-instruct", "tiny:llama"} <= {m["name"] for m in listed["models"]}
    ran = cli_here("run", str(recipe), "--out", str(tmp_path / "out"), "--json", "-q")
    report = json.loads(ran.stdout)
    assert report == json.loads((tmp_path / "out" / "report.json").read_text())
    exported = cli_here("export", str(tmp_path / "out" / "latest"), "--format", "gptq", "--out", str(tmp_path / "e"),
                        "--json")  # fmt: skip
    assert json.loads(exported.stdout) == {"format": "gptq", "out": str(tmp_path / "e")}
