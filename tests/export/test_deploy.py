"""Deployment targets: pre-flight rejections, the roofline, the deploy bundle and its runner (ONNX Runtime as the
stand-in backend), and the TensorRT builder where TensorRT exists."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import cli, cli_here, tiny_recipe, write_recipe
from transformers import AutoModelForCausalLM, LlamaConfig

from dscompress import run as run_recipe
from dscompress.errors import EXIT_BAD_INPUT
from dscompress.export.targets import DEVICES
from dscompress.export.tensorrt import Profile
from dscompress.models.info import inspect_model
from dscompress.plan import make_plan
from dscompress.recipe import TargetSpec, load_recipe

ORIN = '{device: orin-nx-16gb, jetpack: "6.2"}'


def one_line_error(result, expect: str) -> None:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == EXIT_BAD_INPUT and expect in lines[0] and "Traceback" not in result.stderr, (
        result.stderr
    )


@pytest.mark.parametrize(
    ("stage", "target", "expect"),
    [
        ("{rtn: {bits: 4, group_size: 64, symmetric: true}}", ORIN, "INT4 group 64 does not run on orin-nx-16gb"),
        ("{rtn: {bits: 4, group_size: 128, symmetric: false}}", ORIN, "asymmetric INT4"),
        ("{rtn: {bits: 2, group_size: 128}}", ORIN, "INT2 weights do not run on orin-nx-16gb"),
        ("{rtn: {bits: 4, group_size: 128}}", '{device: orin-nx-16gb, jetpack: "6.2", opset: 20}', "needs opset 21"),
        (
            "{rtn: {bits: 8, group_size: -1}}",
            '{device: orin-nx-16gb, jetpack: "6.2", opset: 22}',
            "above opset 21, the newest TensorRT 10.3 (JetPack 6.2) parses",
        ),
        ("{rtn: {bits: 8, group_size: -1}}", "{device: orin-nx-16gb}", "needs jetpack"),
        ("{rtn: {bits: 8, group_size: -1}}", '{device: x86-gpu, jetpack: "6.2"}', "Jetson devices only"),
    ],
)
def test_validate_rejects_impossible_targets_before_any_compute(tmp_path, stage, target, expect):
    recipe = write_recipe(tmp_path / "r.yaml", f"model: {{path: 'tiny:llama'}}\nstages: [{stage}]\ntarget: {target}\n")
    one_line_error(cli_here("validate", str(recipe)), expect)
    one_line_error(cli_here("run", str(recipe), "--out", str(tmp_path / "out")), expect)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_bfloat16_is_refused_on_orin(tmp_path):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        "model: {path: 'tiny:llama', dtype: bfloat16}\n"
        f"stages: [{{rtn: {{bits: 8, group_size: -1}}}}]\ntarget: {ORIN}\n",
    )
    one_line_error(cli_here("validate", str(recipe)), "bfloat16 does not run on orin-nx-16gb")


def _long_context_model(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1 << 20,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "long")
    return tmp_path / "long"


def test_weights_plus_kv_cache_above_device_memory_is_refused(tmp_path):
    model = _long_context_model(tmp_path)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"model: {{path: '{model}'}}\nstages: [{{rtn: {{bits: 8, group_size: -1}}}}]\n"
        "target: {device: orin-nano-8gb, jetpack: '6.2', max_context: 200000, max_batch: 32}\n",
    )
    one_line_error(
        cli_here("validate", str(recipe)), "KV cache 6.10 GiB at 200000 tokens x batch 32 exceed the 6.0 GiB"
    )


def test_plan_predicts_decode_tokens_per_second_from_the_roofline(tmp_path):
    recipe_path = write_recipe(
        tmp_path / "r.yaml",
        "model: {path: 'tiny:llama'}\nstages: [{int8: {fallback: none}}]\n"
        "target: {device: orin-nano-8gb, jetpack: '6.2', max_context: 1024}\n",
    )
    recipe, _ = load_recipe(recipe_path)
    from dscompress.models.sources import resolve

    info = inspect_model(resolve("tiny:llama").directory)
    roof = make_plan(recipe, info)["roofline"]
    kv = 2 * 2 * 2 * 32 * 2 * 1024  # layers x (K, V) x kv_heads x head_dim x fp16 x tokens
    assert roof["kv_bytes_at_max_context"] == kv
    assert roof["decode_tokens_per_s"] == pytest.approx(68.0e9 / roof["bytes_per_token"])
    q_params = sum(t.param.numel() for t in info.targets if t.name != "lm_head")
    assert roof["weight_bytes"] > q_params  # int8 codes, scales, and the float embeddings in FP16
    assert "ceiling" in roof["assumptions"]
    result = cli("plan", str(recipe_path))
    assert result.returncode == 0 and "orin-nano-8gb: decode <=" in result.stdout


def test_profile_shapes_cover_prefill_and_decode():
    target = TargetSpec(device="x86-gpu", max_context=256, opt_context=64, max_batch=2)
    meta = {"layout": {"layers": 1, "key": [2, 16], "value": [2, 16]}}
    shapes = Profile.from_target(target).shapes(meta)
    assert shapes["input_ids"] == ((1, 1), (1, 1), (2, 256))
    assert shapes["past.0.key"] == ((1, 2, 0, 16), (1, 2, 64, 16), (2, 2, 255, 16))
    assert shapes["attention_mask"] == ((1, 1), (1, 65), (2, 256))


@pytest.fixture(scope="module")
def quantized_stages(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deploy")
    stages = (
        "  - int8: {fallback: none}\n    gate: {kl: {max: 1.0}}\n"
        "  - name: w4\n    rtn: {bits: 4, group_size: 128, symmetric: true}\n    gate: {kl: {max: 1.0}}"
    )
    run_recipe(tiny_recipe(tmp / "r.yaml", "tiny:llama", stages), tmp / "out")
    return tmp / "out"


@pytest.mark.parametrize("stage", ["1-int8", "2-w4"])
def test_bundle_is_complete_and_its_runner_passes_through_onnx_runtime(tmp_path, quantized_stages, stage):
    out = tmp_path / "bundle"
    result = cli(
        "bundle",
        str(quantized_stages / stage),
        "--target",
        "orin-nx-16gb",
        "--jetpack",
        "6.2",
        "--max-context",
        "512",
        "--out",
        str(out),
        "--tar",
    )
    assert result.returncode == 0, result.stderr
    files = {p.name for p in out.iterdir()}
    assert {
        "model.onnx",
        "tokenizer.json",
        "build_engine.sh",
        "run.py",
        "verify.sh",
        "manifest.json",
        "verify_windows.npy",
        "export.json",
    } <= files
    assert (tmp_path / "bundle.tar.gz").stat().st_size > 0
    script = (out / "build_engine.sh").read_text()
    assert "--stronglyTyped" in script and "--timingCacheFile=timing.cache" in script
    assert "input_ids:1x512" in script and "past.1.key:1x2x511x32" in script  # max shapes from the target
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"] == {
        "device": "orin-nx-16gb",
        "compute_capability": "8.7",
        "jetpack": "6.2",
        "tensorrt": "10.3",
        "max_batch": 1,
        "max_context": 512,
    }
    assert manifest["files"]["model.onnx"] and manifest["verify"]["expected_perplexity"] > 1
    quant = manifest["export"]["quantization"]
    assert (quant["int8_activations"] > 0) if stage == "1-int8" else (quant["int4_dq"] == 14)
    runner = [sys.executable, str(out / "run.py"), "--backend", "ort"]
    verified = subprocess.run([*runner, "--verify"], capture_output=True, text=True, check=False)
    assert verified.returncode == 0 and verified.stdout.startswith("PASS"), verified.stdout + verified.stderr
    generated = subprocess.run([*runner, "--new-tokens", "5"], capture_output=True, text=True, check=True)
    assert len(json.loads(generated.stdout)["tokens"]) == 5
    missing = subprocess.run([sys.executable, str(out / "run.py"), "--verify"], capture_output=True, text=True)
    assert missing.returncode == 2 and "build_engine.sh" in missing.stderr  # no engine: says how to build one


def test_bundle_refuses_a_grid_the_device_cannot_run(tmp_path):
    stages = "  - rtn: {bits: 4, group_size: 32, symmetric: true}\n    gate: {kl: {max: 1.0}}"
    run_recipe(tiny_recipe(tmp_path / "r.yaml", "tiny:llama", stages), tmp_path / "out")
    result = cli(
        "bundle",
        str(tmp_path / "out" / "1-rtn"),
        "--target",
        "orin-nano-8gb",
        "--jetpack",
        "6.2",
        "--out",
        str(tmp_path / "b"),
    )
    one_line_error(result, "INT4 group 32 does not run on orin-nano-8gb")
    assert not (tmp_path / "b").exists()


def test_tensorrt_engine_builds_and_verifies(tmp_path, quantized_stages):
    pytest.importorskip("tensorrt", reason="TensorRT cannot be installed on this machine (NVIDIA's own index)")
    from dscompress.export.tensorrt import build_engine

    out = tmp_path / "bundle"
    assert (
        cli(
            "bundle", str(quantized_stages / "1-int8"), "--target", "x86-gpu", "--max-context", "256", "--out", str(out)
        ).returncode
        == 0
    )
    profile = Profile.from_target(TargetSpec(device="x86-gpu", max_context=256, opt_context=64))
    sidecar = build_engine(out / "model.onnx", out / "model.engine", profile, 1024, 3, out / "timing.cache")
    assert sidecar["engine_sha256"]
    verified = subprocess.run([sys.executable, str(out / "run.py"), "--verify"], capture_output=True, text=True)
    assert verified.returncode == 0 and verified.stdout.startswith("PASS"), verified.stdout


def test_every_device_has_its_facts():
    for device in DEVICES.values():
        assert device.bandwidth_gbs > 0 and device.memory_bytes > device.usable_bytes > 0
        assert "fp8" not in device.precisions or not device.jetson  # Orin has no FP8 (nor FP4)


@pytest.mark.heavy
def test_edgellm_exports_our_symmetric_g128_gptq_checkpoint(tmp_path):
    """NVIDIA TensorRT-Edge-LLM 0.11's export step (in its own venv: it pins transformers 5.14.1) reads our packed
    GPTQ checkpoint and turns every quantized Linear into its INT4 group-wise GEMM plugin. The engine build needs
    TensorRT on the device (Orin: JetPack 7.2) and is not run here."""
    from conftest import REPO

    stages = "  - gptq: {bits: 4, group_size: 128, symmetric: true}"
    recipe = tiny_recipe(tmp_path / "r.yaml", "tiny:qwen3", stages)
    assert cli("run", str(recipe), "--out", str(tmp_path / "out")).returncode == 0
    packed, edge = tmp_path / "g", tmp_path / "edge"
    assert cli("export", str(tmp_path / "out" / "1-gptq"), "--format", "gptq", "--out", str(packed)).returncode == 0
    script = str(REPO / "bench" / "edgellm_export.py")
    done = subprocess.run([sys.executable, script, "--checkpoint", str(packed), "--out", str(edge)],
                          capture_output=True, text=True, timeout=3000)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["int4_plugin_linears"] == 14  # 7 projections x 2 layers
    assert result["operators"]["trt_edgellm::AttentionPlugin"] == 2
