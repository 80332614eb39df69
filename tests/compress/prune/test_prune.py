"""Structured pruning on every architecture: stock-loadable checkpoints, KV-group invariants, plan agreement,
exact identity at ratio 0, and one-line errors for impossible targets."""

import json
import shutil

import pytest
import torch
from conftest import cli_here, tiny_recipe
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from dscompress import run as run_recipe
from dscompress.compress.prune.advice import advice
from dscompress.errors import EXIT_BAD_INPUT
from dscompress.models.info import inspect_model
from dscompress.models.load import load_model
from dscompress.models.sources import resolve
from dscompress.models.tiny import TINY_ARCHS
from dscompress.plan import make_plan
from dscompress.recipe import load_recipe

PRUNE = {
    "llama": "{mlp: {ratio: 0.25}, heads: {ratio: 0.5}, depth: {size: 1}, hidden: {ratio: 0.25}}",
    "qwen2": "{mlp: {ratio: 0.25}, heads: {ratio: 0.5, mode: kv_group}, depth: {size: 1}, hidden: {size: 64}}",
    "qwen3": "{importance: l1, mlp: {size: 192}, heads: {size: 2}, depth: {size: 1, metric: perplexity}}",
    "qwen3_moe": "{mlp: {ratio: 0.5}, heads: {ratio: 0.5}, depth: {size: 1}, experts: {size: 2}, hidden: {size: 96}}",
    "deepseek_v3": "{mlp: {ratio: 0.25}, heads: {ratio: 0.5}, depth: {size: 2}, experts: {size: 3}, "
    "hidden: {size: 96}}",
}
HIDDEN = {"llama": 96, "qwen2": 64, "qwen3": 128, "qwen3_moe": 96, "deepseek_v3": 96}


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_pruned_checkpoint_loads_stock_and_keeps_kv_invariants(tmp_path, arch):
    stages = f"  - prune: {PRUNE[arch]}\n    gate: {{kl: {{max: 20}}}}"
    recipe_path = tiny_recipe(tmp_path / "r.yaml", f"tiny:{arch}", stages)
    report = run_recipe(recipe_path, tmp_path / "out")
    stage = tmp_path / "out" / "1-prune"
    model = AutoModelForCausalLM.from_pretrained(stage)
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)
    params = sum(p.numel() for p in model.parameters())
    recipe, _ = load_recipe(recipe_path)
    planned = make_plan(recipe, inspect_model(resolve(f"tiny:{arch}").directory))["stages"][0]["params"]
    assert params == planned == report["stages"][1]["summary"]["params_after"]
    c = model.config
    attn = model.model.layers[0].self_attn
    assert c.hidden_size == HIDDEN[arch] == model.model.embed_tokens.weight.shape[1] == model.lm_head.in_features
    assert model.model.norm.weight.shape == (c.hidden_size,)
    if arch in ("qwen3_moe", "deepseek_v3"):
        moe = model.model.layers[-1].mlp
        kept = 2 if arch == "qwen3_moe" else 3
        assert moe.experts.gate_up_proj.shape[0] == moe.gate.weight.shape[0] == kept
        assert moe.gate.weight.shape[1] == moe.experts.down_proj.shape[1] == c.hidden_size
        moe_layers = sum(hasattr(layer.mlp, "experts") for layer in model.model.layers)
        assert len(report["stages"][1]["summary"]["kept"]["experts"]) == moe_layers
    if arch == "deepseek_v3":
        assert c.n_routed_experts == 3 and model.model.layers[1].mlp.gate.e_score_correction_bias.shape == (3,)
        assert c.num_attention_heads == 2 and c.num_hidden_layers == 2 and c.first_k_dense_replace == 1
        qk = c.qk_nope_head_dim + c.qk_rope_head_dim
        assert attn.q_b_proj.out_features == 2 * qk and attn.o_proj.in_features == 2 * c.v_head_dim
        assert attn.kv_b_proj.out_features == 2 * (c.qk_nope_head_dim + c.v_head_dim)
        assert model.model.layers[1].mlp.experts.down_proj.shape[-1] == c.moe_intermediate_size == 96
        return
    assert c.num_attention_heads % c.num_key_value_heads == 0 and c.head_dim == 32
    assert attn.q_proj.out_features == c.num_attention_heads * c.head_dim
    assert attn.k_proj.out_features == attn.v_proj.out_features == c.num_key_value_heads * c.head_dim
    expected_kv = {"qwen2": 1}.get(arch, 2)  # kv_group mode drops whole groups; query mode keeps them
    assert c.num_key_value_heads == expected_kv and c.num_attention_heads == 2
    if arch == "qwen3_moe":
        assert model.model.layers[0].mlp.experts.gate_up_proj.shape[1] == 2 * c.moe_intermediate_size == 128
    scores = load_file(str(stage / "importance.safetensors"))
    assert "layers.0.heads" in scores and (arch == "qwen3" or "blocks" in scores)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3_moe"])
def test_pruning_at_ratio_zero_is_an_exact_identity(tmp_path, arch):
    zero = "{ratio: 0.0}"
    experts = f", experts: {zero}" if arch == "qwen3_moe" else ""
    prune = f"{{mlp: {zero}, heads: {zero}, depth: {zero}, hidden: {zero}{experts}}}"
    stages = f"  - prune: {prune}\n    gate: {{kl: {{max: 1}}}}"
    report = run_recipe(tiny_recipe(tmp_path / "r.yaml", f"tiny:{arch}", stages), tmp_path / "out")
    assert report["stages"][1]["metrics"]["kl"] < 1e-6  # the stored baseline is float16: not exactly 0
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    before, after = load_model(resolve(f"tiny:{arch}").directory), load_model(tmp_path / "out" / "1-prune")
    with torch.no_grad():
        assert torch.equal(before(ids).logits, after(ids).logits)


def test_importance_is_deterministic(tmp_path):
    stages = "  - prune: {mlp: {ratio: 0.5}}\n    gate: {kl: {max: 20}}"
    for run in ("a", "b"):
        run_recipe(tiny_recipe(tmp_path / f"{run}.yaml", "tiny:llama", stages), tmp_path / run)
    a = load_file(str(tmp_path / "a" / "1-prune" / "importance.safetensors"))
    b = load_file(str(tmp_path / "b" / "1-prune" / "importance.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    manifest = json.loads((tmp_path / "a" / "1-prune" / "manifest.json").read_text())
    assert manifest["summary"]["sizes"] == {"intermediate_size": 128}


@pytest.mark.parametrize(
    ("arch", "prune", "expect"),
    [
        ("llama", "{heads: {ratio: 0.9}}", "leaves 0 query heads per KV group"),
        ("llama", "{heads: {size: 3}}", "3 query heads do not divide across 2 KV groups; use a multiple of 2"),
        ("deepseek_v3", "{heads: {ratio: 0.5, mode: kv_group}}", "MLA (DeepSeek) has no KV groups"),
        ("llama", "{mlp: {size: 100000}}", "keeps 100000 of 256 intermediate_size"),
        ("llama", "{mlp: {ratio: 0.5, size: 3}}", "exactly one of ratio or size"),
        ("llama", "{}", "at least one of mlp, heads, depth, hidden, experts"),
        ("llama", "{experts: {size: 2}}", "llama has no routed experts; prune mlp instead"),
        ("qwen3_moe", "{experts: {size: 1}}", "keeps 1 of 4 experts; each token is routed to 2"),
        ("llama", "{hidden: {ratio: 1.0}}", "less than 1"),
        ("llama", "{depth: {size: 2, metric: ppl}}", "'block_importance' or 'perplexity'"),
    ],
)
def test_bad_targets_are_one_line_errors(tmp_path, arch, prune, expect):
    recipe = tiny_recipe(tmp_path / "r.yaml", f"tiny:{arch}", f"  - prune: {prune}")
    result = cli_here("run", str(recipe), "--out", str(tmp_path / "out"))
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == EXIT_BAD_INPUT and expect in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_hidden_pruning_refuses_tied_weights_that_disagree(tmp_path):
    """config.json says tied, but the stored lm_head differs: transformers would silently drop it."""
    source = tmp_path / "model"
    shutil.copytree(resolve("tiny:llama").directory, source)
    weights = load_file(str(source / "model.safetensors"))
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"] + 0.01
    save_file(weights, str(source / "model.safetensors"), metadata={"format": "pt"})
    recipe = tiny_recipe(tmp_path / "r.yaml", str(source), "  - prune: {hidden: {ratio: 0.25}}")
    result = cli_here("run", str(recipe), "--out", str(tmp_path / "out"))
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == EXIT_BAD_INPUT and "lm_head.weight differs" in lines[0], result.stderr
    assert "stages[0].prune.hidden" in lines[0] and not (tmp_path / "out" / "1-prune").exists()
    ok = tiny_recipe(tmp_path / "ok.yaml", str(source), "  - prune: {mlp: {ratio: 0.25}}")
    assert cli_here("validate", str(ok)).returncode == 0  # other dimensions are fine


def test_plan_advice_comes_from_the_measured_family():
    """Qwen and SmolLM2 disagree at 40% (MLP alone 46.8 vs depth 1/3 + MLP on SmolLM2): each family gets its own."""
    assert advice(0.41, "qwen2").startswith("Qwen2.5-Coder-0.5B (Qwen2) at 40%") and "46.80" in advice(0.4, "qwen3")
    assert advice(0.38, "llama").startswith("SmolLM2-135M (Llama) at 40%") and "depth: {ratio: 0.18}" in advice(0.4)
    assert "at 10%" in advice(0.02, "deepseek_v3")  # an unmeasured family gets the nearest measured share, labelled
