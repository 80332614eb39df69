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


@pytest.mark.parametrize(("arch", "builder"), [("llama", True), ("qwen2", True), ("qwen3", True), ("qwen3_moe", False)])
def test_int4_stages_go_through_ort_genais_own_builder_on_our_grid(tmp_path, arch, builder):
    """A 4-bit weight-only stage of a dense model is written by ORT GenAI's model builder from our packed GPTQ
    checkpoint (GroupQueryAttention, fused q/k/v); the parity gate runs on that graph; its cache, fed back step by
    step, gives the full window's logits; ORT GenAI generates our loop's tokens. MoE stages keep our graph."""
    from conftest import tiny_recipe

    from dscompress import run as run_recipe

    stages = ("  - rtn: {bits: 4, group_size: 32, symmetric: false}\n"
              "    onnx: {targets: [ort-genai], parity: {max_kl_diff: 0.0005}}")  # fmt: skip
    report = run_recipe(tiny_recipe(tmp_path / "r.yaml", f"tiny:{arch}", stages), tmp_path / "out")
    assert report["result"] == "passed", report
    out = tmp_path / "out" / "1-rtn" / "onnx" / "ort-genai"
    meta = json.loads((out / "export.json").read_text())
    assert ("model builder" in meta["graph"]) == builder
    if builder:
        layers = meta["layout"]["layers"]
        assert meta["quantization"]["group_query_attention"] == layers and "position_ids" not in meta["inputs"]
        assert meta["quantization"]["matmulnbits"] == 5 * layers  # q/k/v fused; o, gate, up, down
        assert json.loads((out / CONFIG_FILE).read_text())["search"]["past_present_share_buffer"] is True
    lm = OrtLM(out)
    ids = torch.randint(3, 256, (1, 24), generator=torch.Generator().manual_seed(4))
    full = lm.logits(ids)[0]
    logits, past = lm.step(ids[:, :16].numpy(), lm.empty_past(1), 0)
    for t in range(16, 24):  # one token at a time through the cache the graph returned
        logits, past = lm.step(ids[:, t : t + 1].numpy(), past, t)
        torch.testing.assert_close(torch.from_numpy(logits[0, -1]), full[t], atol=2e-4, rtol=1e-4)
    ours, _ = lm.greedy(PROMPT, 10)
    assert genai_greedy(out, PROMPT.tolist(), 10) == ours
