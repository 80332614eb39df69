"""The `ort-genai` target, opened by ONNX Runtime GenAI itself (pip onnxruntime-genai): the tokens it generates
must equal our ONNX Runtime loop's and the torch model's."""

import json

import pytest
import torch
from conftest import cli_here

from dscompress.export.genai import CONFIG_FILE, genai_greedy
from dscompress.export.ort_runner import OrtLM, torch_greedy
from dscompress.export.stage_export import export_stage
from dscompress.models.load import load_model
from dscompress.models.sources import resolve

PROMPT = torch.randint(3, 256, (12,), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "qwen3_moe"])
def test_ort_genai_generates_what_torch_and_our_loop_generate(tmp_path, arch):
    stage = resolve(f"tiny:{arch}").directory
    meta = export_stage(stage, "ort-genai", tmp_path / "g")
    assert meta["inputs"][3] == "past_key_values.0.key"  # the names ORT GenAI and optimum use
    config = json.loads((tmp_path / "g" / CONFIG_FILE).read_text())
    assert config["search"]["past_present_share_buffer"] is False  # the graph concatenates its cache
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in (tmp_path / "g").iterdir()}
    ours, _ = OrtLM(tmp_path / "g").greedy(PROMPT, 10)
    assert genai_greedy(tmp_path / "g", PROMPT.tolist(), 10) == ours == torch_greedy(load_model(stage), PROMPT, 10)


def test_ort_genai_runs_a_gptq_stage_with_int8_activations_in_matmulnbits(tmp_path):
    from dscompress.compress.gptq.apply import apply
    from dscompress.compress.gptq.config import GPTQConfig
    from dscompress.context import StageContext

    model = load_model(resolve("tiny:qwen2").directory)
    calib = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(0))
    with StageContext.standalone(model, calib, quiet=True) as ctx:
        out = apply(model, GPTQConfig(bits=4, group_size=32, symmetric=False), ctx)
    model.save_pretrained(tmp_path / "stage")
    out.quant.save(tmp_path / "stage")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "stage" / f).write_bytes((resolve("tiny:qwen2").directory / f).read_bytes())
    meta = export_stage(tmp_path / "stage", "ort-genai", tmp_path / "g", accuracy_level=4)
    assert meta["quantization"]["matmulnbits"] > 0 and meta["accuracy_level"] == 4
    ours, _ = OrtLM(tmp_path / "g").greedy(PROMPT, 8)
    assert genai_greedy(tmp_path / "g", PROMPT.tolist(), 8) == ours


def test_mla_is_refused_before_any_export_work(tmp_path):
    result = cli_here("export", str(resolve("tiny:deepseek_v3").directory), "--format", "ort-genai", "--out",
                      str(tmp_path / "x"))  # fmt: skip
    assert result.returncode == 2
    assert "ort-genai target cannot describe a deepseek_v3 model: its MLA cache" in result.stderr
    assert not (tmp_path / "x").exists()


def test_accuracy_level_is_refused_for_the_tensorrt_target(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {path: 'tiny:llama'}\nstages:\n  - rtn: {bits: 4, group_size: 32}\n"
                      "    onnx: {targets: [onnx, ort-genai], accuracy_level: 4}\n")  # fmt: skip
    result = cli_here("validate", str(recipe))
    assert result.returncode == 2 and "the onnx target (TensorRT) keeps float32" in result.stderr
