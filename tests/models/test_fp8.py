"""FP8 source checkpoints in DeepSeek-V3's layout (float8_e4m3fn weights, float32 `weight_scale_inv` per 128 x 128
block, `quantization_config: {quant_method: fp8, fmt: e4m3, weight_block_size: [128, 128]}`), written here from
the tiny models: dequantized shard by shard to bf16, run through a recipe, and bad ones refused in one line."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import cli_here, tiny_recipe
from safetensors.torch import load_file, save_file

import dscompress
from dscompress.errors import EXIT_BAD_INPUT
from dscompress.models.fp8 import dequantize_blocks
from dscompress.models.sources import resolve

BLOCK = (128, 128)


def quantize_blocks(w: torch.Tensor, block=BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's recipe: per block, scale = amax / 448 (e4m3's largest), w8 = w / scale."""
    rows, cols = w.shape
    sr, sc = math.ceil(rows / block[0]), math.ceil(cols / block[1])
    scale = torch.zeros(sr, sc)
    w8 = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(sr):
        for j in range(sc):
            part = w[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]].float()
            scale[i, j] = part.abs().max().clamp(min=1e-12) / 448.0
            w8[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]] = (part / scale[i, j]).to(
                torch.float8_e4m3fn
            )
    return w8, scale


def reference(w8: torch.Tensor, scale: torch.Tensor, block=BLOCK) -> torch.Tensor:
    out = w8.float().clone()
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            out[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]] *= scale[i, j]
    return out.bfloat16()


def quantized(name: str) -> bool:
    """What DeepSeek-V3 stores in FP8: every projection of the decoder layers (not norms, router, embeddings)."""
    return ".layers." in name and name.endswith(("proj.weight", "proj_with_mqa.weight"))


def write_fp8(arch: str, directory: Path, qc: dict | None = None) -> dict[str, torch.Tensor]:
    """The tiny model as an FP8 checkpoint in two shards with an index; one scale tensor is put in the other
    shard than its weight (the index allows it). Returns the expected bf16 weights."""
    source = resolve(f"tiny:{arch}").directory
    shutil.copytree(source, directory, ignore=shutil.ignore_patterns("*.safetensors", ".*", "*.index.json"))
    for f in directory.iterdir():
        f.chmod(0o644)
    tensors, expected = load_file(source / "model.safetensors"), {}
    out: dict[str, torch.Tensor] = {}
    for name, w in tensors.items():
        if quantized(name):
            w8, scale = quantize_blocks(w)
            out[name], out[name + "_scale_inv"] = w8, scale
            expected[name] = reference(w8, scale)
        else:
            out[name] = w.bfloat16()
    names = sorted(out)
    half = set(names[: len(names) // 2])
    moved = next(n for n in names if n.endswith("_scale_inv") and n.removesuffix("_scale_inv") in half)
    half.discard(moved)  # its weight is in shard 1, the scale goes to shard 2
    shards = {"model-00001-of-00002.safetensors": half, "model-00002-of-00002.safetensors": set(names) - half}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: out[k] for k in keys}, str(directory / shard), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(keys, shard)
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = qc or {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                           "weight_block_size": list(BLOCK)}  # fmt: skip
    (directory / "config.json").write_text(json.dumps(config))
    return expected


def test_block_dequantization_handles_partial_edge_blocks_and_expert_stacks():
    w = torch.randn(40, 50) * 0.02
    w8, scale = quantize_blocks(w, (16, 16))
    assert torch.equal(dequantize_blocks(w8, scale, (16, 16), "w"), reference(w8, scale, (16, 16)))
    stacked = dequantize_blocks(torch.stack([w8, w8]), torch.stack([scale, scale * 2]), (16, 16), "experts")
    assert torch.equal(stacked[0], reference(w8, scale, (16, 16)))
    assert torch.equal(stacked[1], reference(w8, scale * 2, (16, 16)))


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen3"])
def test_fp8_checkpoint_is_read_and_runs_a_recipe(tmp_path, arch):
    expected = write_fp8(arch, tmp_path / "fp8")
    out = tmp_path / "out"
    dscompress.run(tiny_recipe(tmp_path / "r.yaml", model=str(tmp_path / "fp8")), out)
    from safetensors import safe_open

    baseline = {}
    for shard in (out / "0-baseline").glob("*.safetensors"):
        if shard.name.startswith("model"):
            with safe_open(str(shard), "pt") as f:
                baseline |= {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert not any(k.endswith("_scale_inv") for k in baseline)
    for name, weight in expected.items():  # exactly w8 x its block scale, in bf16
        assert torch.equal(baseline[name], weight), name
    assert json.loads((out / "0-baseline" / "config.json").read_text()).get("quantization_config") is None
    assert (out / "latest").resolve().name == "1-rtn"


def _break(directory: Path, how: str) -> None:
    shard = sorted(directory.glob("*.safetensors"))[0]
    tensors = load_file(shard)
    scales = [k for k in tensors if k.endswith("_scale_inv")]
    if how == "missing scale":
        index_path = directory / "model.safetensors.index.json"
        index = json.loads(index_path.read_text())
        del tensors[scales[0]], index["weight_map"][scales[0]]
        index_path.write_text(json.dumps(index))
    else:
        tensors[scales[0]] = torch.ones(3, 3)
    save_file(tensors, str(shard), metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("missing scale", "without its"),
        ("scale shape", "needs"),
        ("unknown fmt", "not a known FP8 format"),
        ("no block size", "weight_block_size"),
    ],
)
def test_bad_fp8_checkpoints_are_one_line_and_exit_2(tmp_path, case, needle):
    qc = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    if case == "unknown fmt":
        qc["fmt"] = "e3m4"
    if case == "no block size":
        del qc["weight_block_size"]
    write_fp8("qwen3", tmp_path / "fp8", qc)
    if case in ("missing scale", "scale shape"):
        _break(tmp_path / "fp8", case)
    result = cli_here("validate", str(tiny_recipe(tmp_path / "r.yaml", model=str(tmp_path / "fp8"))))
    assert result.returncode == EXIT_BAD_INPUT, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], result.stderr


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen3_moe"])
def test_a_streamed_recipe_reads_fp8_as_it_is_and_equals_the_converted_run(tmp_path, arch, monkeypatch):
    """model.stream: no bf16 copy of the checkpoint is written (the conversion would fail here); each FP8 weight
    is dequantized as its layer is read, and the stage equals the streamed run on the converted checkpoint."""
    from transformers import AutoModelForCausalLM

    from dscompress.models import packed

    write_fp8(arch, tmp_path / "fp8")
    gptq = "  - gptq: {bits: 4, group_size: 32}\n    gate: {kl: {max: 5.0}}"

    def streamed(name: str, model: str) -> dict:
        recipe = tiny_recipe(tmp_path / f"{name}.yaml", model, gptq)
        recipe.write_text(recipe.read_text().replace(f'path: "{model}"', f'path: "{model}", stream: true'))
        report = dscompress.run(recipe, tmp_path / name)
        stage = tmp_path / name / "1-gptq"
        assert json.loads((stage / "config.json").read_text()).get("quantization_config") is None
        return {"report": report, "weights": AutoModelForCausalLM.from_pretrained(str(stage)).state_dict()}

    def no_conversion(*args):
        raise AssertionError("the FP8 checkpoint was converted")

    with monkeypatch.context() as m:
        m.setattr(packed, "import_fp8", no_conversion)
        direct = streamed("direct", str(tmp_path / "fp8"))
        assert cli_here("plan", str(tmp_path / "direct.yaml")).returncode == 0
    converted = streamed("converted", str(resolve(str(tmp_path / "fp8")).directory))
    metrics = [[s["metrics"] for s in r["report"]["stages"]] for r in (direct, converted)]
    assert metrics[0] == metrics[1]
    assert direct["weights"].keys() == converted["weights"].keys()
    assert all(torch.equal(direct["weights"][k], converted["weights"][k]) for k in direct["weights"])


@pytest.mark.parametrize("case", ["missing scale", "scale shape"])
def test_a_bad_fp8_checkpoint_is_refused_from_its_headers_when_streamed(tmp_path, case):
    write_fp8("qwen3", tmp_path / "fp8")
    _break(tmp_path / "fp8", case)
    model = str(tmp_path / "fp8")
    recipe = tiny_recipe(tmp_path / "r.yaml", model, "  - gptq: {bits: 4, group_size: 32}")
    recipe.write_text(recipe.read_text().replace(f'path: "{model}"', f'path: "{model}", stream: true'))
    result = cli_here("validate", str(recipe))
    assert result.returncode == EXIT_BAD_INPUT, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and ("without its" in lines[0] or "needs" in lines[0]), result.stderr
