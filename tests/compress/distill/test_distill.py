"""The distill pass on tiny models: KL to the teacher falls, 2 gloo processes match 1, a SIGKILLed run resumes to
the same bytes, quantized students stay on their grid, layer/width mappings, top-k teacher cache, bad options."""

import json
import shutil

import pytest
import torch
from conftest import TINY_RECIPE, cli, cli_here, run_and_sigkill, write_recipe
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from dscompress import run as run_recipe
from dscompress.compress.distill.ste import off_grid
from dscompress.errors import EXIT_BAD_INPUT
from dscompress.models.load import load_model
from dscompress.models.sources import resolve
from dscompress.quant.qstate import QuantState

PRUNE = "  - prune: {mlp: {ratio: 0.5}, heads: {ratio: 0.5}}\n"
DISTILL = ("  - distill: {{budget: {{tokens: {tokens}}}, lr: 0.003, eval_every: 10, checkpoint_every: 10, "
           "stop_when_gate_met: false{extra}}}\n    gate: {{kl: {{max: 1.0}}}}\n")  # fmt: skip


def recipe(tmp_path, stages: str, model: str = "tiny:llama", name: str = "r.yaml"):
    text = TINY_RECIPE.format(model=model, stages=stages.rstrip("\n"))
    return write_recipe(tmp_path / name, text.replace("train: {samples: 4,", "train: {samples: 32,"))


def distill(tokens: int = 20480, **extra) -> str:
    more = "".join(f", {k}: {v}" for k, v in extra.items())
    return DISTILL.format(tokens=tokens, extra=more)


def summary(out, stage="2-distill"):
    return json.loads((out / stage / "manifest.json").read_text())["summary"]


def test_kl_to_the_teacher_falls_and_the_student_loads_stock(tmp_path):
    report = run_recipe(recipe(tmp_path, PRUNE + distill()), tmp_path / "out")
    history = summary(tmp_path / "out")["history"]
    assert history[0]["step"] == 0 and history[-1]["step"] == 40
    assert history[-1]["kl"] <= 0.7 * history[0]["kl"], history  # at least 30% lower within 40 steps
    assert report["stages"][2]["metrics"]["kl"] < report["stages"][1]["metrics"]["kl"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "2-distill")
    assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False).shape == (1, 6)


def test_two_gloo_processes_match_one(tmp_path):
    one = run_recipe(recipe(tmp_path, PRUNE + distill(10240)), tmp_path / "one")
    two = run_recipe(recipe(tmp_path, PRUNE + distill(10240, devices=2), name="two.yaml"), tmp_path / "two")
    assert summary(tmp_path / "two")["world_size"] == 2 and summary(tmp_path / "one")["world_size"] == 1
    a, b = one["stages"][2]["metrics"], two["stages"][2]["metrics"]
    assert a["kl"] == pytest.approx(b["kl"], rel=1e-3) and a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-4)
    wa, wb = (load_file(str(tmp_path / d / "2-distill" / "model.safetensors")) for d in ("one", "two"))
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4  # same steps, reduction order aside


def test_sigkilled_distillation_resumes_to_identical_bytes(tmp_path):
    stages = PRUNE + distill(40960)
    run_recipe(recipe(tmp_path, stages), tmp_path / "full")
    killed = tmp_path / "killed"
    run_and_sigkill(recipe(tmp_path, stages, name="k.yaml"), killed, ".resume/2-distill-*/ckpt/state.json")
    assert not (killed / "2-distill").exists()
    assert cli("run", str(tmp_path / "k.yaml"), "--out", str(killed)).returncode == 0
    assert summary(killed)["resumed_from_step"] >= 10
    full = (tmp_path / "full" / "2-distill" / "model.safetensors").read_bytes()
    assert (killed / "2-distill" / "model.safetensors").read_bytes() == full
    untimed = [[{k: v for k, v in h.items() if k != "train_seconds"} for h in summary(out)["history"]]
               for out in (killed, tmp_path / "full")]  # fmt: skip
    assert untimed[0] == untimed[1]
    assert not list((killed / ".resume").glob("*"))  # checkpoints go once the stage is complete


@pytest.mark.parametrize("mode", ["ste", "requantize"])
def test_quantized_student_stays_on_its_grid(tmp_path, mode):
    rtn = "  - rtn: {bits: 4, group_size: 64, symmetric: false}\n"
    run_recipe(recipe(tmp_path, rtn + distill(10240, quantized=mode)), tmp_path / "out")
    stage, before = tmp_path / "out" / "2-distill", tmp_path / "out" / "1-rtn"
    quant, old = QuantState.load(stage), QuantState.load(before)
    model = load_model(stage)
    assert off_grid(model, quant) == []  # every quantized weight is exactly (q - zero) * scale
    trained, start = load_file(str(stage / "model.safetensors")), load_file(str(before / "model.safetensors"))
    names = [k + ".weight" for k in quant.targets if k + ".weight" in trained]
    assert names and any(not torch.equal(trained[k], start[k]) for k in names)
    same_scales = all(torch.equal(quant.tensors[k], old.tensors[k]) for k in old.tensors)
    assert same_scales == (mode == "ste") and summary(tmp_path / "out")["quantized"] == mode


def test_hidden_loss_maps_pruned_layers_and_channels(tmp_path):
    prune = "  - prune: {depth: {size: 1}, hidden: {ratio: 0.25}}\n"
    hidden = "{layers: [0], loss: cosine}"
    run_recipe(recipe(tmp_path, prune + distill(5120, hidden=hidden)), tmp_path / "out")
    kept = json.loads((tmp_path / "out" / "1-prune" / "manifest.json").read_text())["summary"]["kept_layers"]
    s = summary(tmp_path / "out")
    assert s["layer_map"] == kept and s["hidden_channels_from_prune"] is True


def test_precomputed_teacher_topk(tmp_path):
    report = run_recipe(recipe(tmp_path, PRUNE + distill(teacher_topk=128)), tmp_path / "out")
    history = summary(tmp_path / "out")["history"]
    assert history[-1]["kl"] <= 0.7 * history[0]["kl"] and report["result"] == "passed"


def other_vocabulary(path):
    model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                                                         num_hidden_layers=1, num_attention_heads=2))  # fmt: skip
    model.save_pretrained(path)
    for f in resolve("tiny:llama").directory.glob("tokenizer*"):
        shutil.copy(f, path / f.name)
    return path


@pytest.mark.parametrize(
    ("stages", "expect"),
    [
        (PRUNE + distill(teacher="rtn"), "stages[1].distill.teacher: 'rtn' is not an earlier stage; allowed: "
                                         "baseline, prune, or a checkpoint path"),
        (PRUNE + distill(tokens=0), "stages[1].distill.budget.tokens"),
        (PRUNE + distill(teacher="VOCAB"), "has a vocabulary of 512 and the student 320"),
        (PRUNE + distill(hidden="{layers: [5]}"), "[5] are not student layers (0..1)"),
        (PRUNE + distill(batch_size=6, grad_accum=4), "batch_size 6 does not split into grad_accum 4 parts"),
        (PRUNE + distill(lora="{targets: [qkv_proj]}"), "stages[1].distill.lora.targets: ['qkv_proj'] name no "
                                                        "decoder Linear of this model; allowed: all-linear or some of"),
    ],
)  # fmt: skip
def test_bad_options_are_one_line_errors(tmp_path, stages, expect):
    stages = stages.replace("VOCAB", str(other_vocabulary(tmp_path / "other")))
    result = cli_here("run", str(recipe(tmp_path, stages)), "--out", str(tmp_path / "out"))
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == EXIT_BAD_INPUT and expect in lines[0], result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_w8a8_student_is_refused(tmp_path):
    int8 = "  - int8: {fallback: none}\n"
    result = cli_here("run", str(recipe(tmp_path, int8 + distill())), "--out", str(tmp_path / "out"))
    assert result.returncode == EXIT_BAD_INPUT and "distill before the int8 stage" in result.stderr, result.stderr
    assert (tmp_path / "out" / "1-int8").is_dir() and not (tmp_path / "out" / "2-distill").exists()


def test_chunked_kd_loss_and_gradient_equal_the_plain_formula(monkeypatch):
    import torch.nn.functional as F

    from dscompress.compress.distill import train as distill_train

    monkeypatch.setattr(distill_train._FullKD, "CHUNK", 7)  # chunks that do not divide the 33 tokens
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(3, 11, 50, dtype=torch.float64, generator=gen, requires_grad=True)
    t = torch.randn(3, 11, 50, dtype=torch.float64, generator=gen)
    for temperature in (1.0, 2.0):
        p, q = F.log_softmax(t / temperature, -1), F.log_softmax(s / temperature, -1)
        ref = (p.exp() * (p - q)).sum(-1).mean() * temperature**2
        out = distill_train.kd_loss(s, t, temperature)
        (g_ref,), (g,) = torch.autograd.grad(ref, s), torch.autograd.grad(out, s)
        assert float(out.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
        assert torch.allclose(g, g_ref, atol=1e-8)


def test_plan_reports_training_memory_and_prune_advice(tmp_path):
    result = cli("plan", str(recipe(tmp_path, PRUNE + distill())), "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    prune, train = plan["stages"]
    assert plan["params"] > prune["params"] == train["params"]  # the header is the source model
    assert train["train_memory_bytes"] > 16 * train["params"] and "lost least" in prune["advice"]
    lora = json.loads(cli("plan", str(recipe(tmp_path, PRUNE + distill(lora=LORA), name="l.yaml")), "--json").stdout)
    saved = train["train_memory_bytes"] - lora["stages"][1]["train_memory_bytes"]
    # 12 of 16 bytes per frozen weight, minus the adapters' 16: 24,576 of them, as peft injects (the LoRA run's
    # summary on this pruned student says the same)
    assert saved == 12 * train["params"] - 16 * 24576


def test_topk_cache_key_follows_the_teachers_weights_and_the_text(tmp_path):
    from types import SimpleNamespace

    from dscompress.compress.distill.loop import _topk_key

    teacher = tmp_path / "teacher"
    shutil.copytree(resolve("tiny:llama").directory, teacher)
    train = torch.arange(64).reshape(4, 16)
    job = SimpleNamespace(teacher_dir=teacher, train=train, dtype="float32")
    key = _topk_key(job)
    assert _topk_key(SimpleNamespace(teacher_dir=teacher, train=train + 1, dtype="float32")) != key
    weights = load_file(str(teacher / "model.safetensors"))
    name = next(iter(weights))
    weights[name] = weights[name] + 1
    save_file(weights, str(teacher / "model.safetensors"))
    assert _topk_key(job) != key


LORA = "{rank: 8, alpha: 16}"


def test_lora_recovers_a_pruned_student_and_merges_into_a_stock_checkpoint(tmp_path):
    report = run_recipe(recipe(tmp_path, PRUNE + distill(lora=LORA)), tmp_path / "out")
    s = summary(tmp_path / "out")
    assert s["history"][-1]["kl"] <= 0.8 * s["history"][0]["kl"], s["history"]
    adapters = s["lora"]
    assert adapters["adapted_linears"] == 14 and adapters["merged"] == "float"  # 7 Linears x 2 layers
    assert adapters["trainable_params"] == 24576  # rank 8 x (in + out) summed over the 14 pruned Linears
    assert adapters["trainable_params"] < 0.25 * adapters["frozen_params"]
    assert report["stages"][2]["metrics"]["kl"] < report["stages"][1]["metrics"]["kl"]
    stored = load_file(str(tmp_path / "out" / "2-distill" / "model.safetensors"))
    assert not [k for k in stored if "lora" in k or "base_layer" in k]
    before = load_file(str(tmp_path / "out" / "1-prune" / "model.safetensors"))
    assert all(torch.equal(stored[k], before[k]) for k in stored if "norm" in k or "embed" in k)  # frozen
    assert any(not torch.equal(stored[k], before[k]) for k in stored if k.endswith("q_proj.weight"))  # merged
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "2-distill")
    assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False).shape == (1, 6)


def test_lora_through_the_grid_computes_the_merged_quantized_weight():
    """The ste adapter layer's output is x Q(W0 + D)^T exactly; its adapters get the straight-through gradient."""
    from dscompress.compress.distill import lora
    from dscompress.compress.distill.config import LoraSettings
    from dscompress.quant.primitives import fake_quantize

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False))
    w0, scale, zero = fake_quantize(model[0].weight.detach(), 4, 16, False)
    with torch.no_grad():
        model[0].weight.copy_(w0)
    grid = QuantState("rtn", 4, 16, False)
    grid.add("0", "linear", w0.shape, scale, zero)
    adapters = lora.attach(model, LoraSettings(rank=4, alpha=8, targets=["0"]), seed=1, grid=grid)
    assert adapters.through_grid == ["0"]
    layer = model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.05)  # a delta large enough to move codes
    x = torch.randn(5, 64)
    delta = layer.get_delta_weight("default").detach()
    quantized = (torch.round((w0 + delta).reshape(32, 4, 16) / scale[..., None]) + zero[..., None]).clamp(0, 15)
    expected_w = ((quantized - zero[..., None]) * scale[..., None]).reshape(32, 64)
    out = model(x)
    assert torch.allclose(out, x @ expected_w.T, atol=1e-5) and not torch.equal(expected_w, w0)
    out.square().sum().backward()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    grad_w = 2 * out.detach().T @ x  # d/dW of sum((x W^T)^2) at the quantized W, passed straight through
    s = layer.scaling["default"]
    assert torch.allclose(b.grad, s * grad_w @ a.detach().T, atol=1e-4)
    assert torch.allclose(a.grad, s * b.detach().T @ grad_w, atol=1e-4)
    assert lora.merge(model) == 1 and isinstance(model[0], torch.nn.Linear)
    assert torch.allclose(model[0].weight, w0 + delta, atol=1e-6)


@pytest.mark.parametrize("mode", ["ste", "requantize"])
def test_lora_on_a_quantized_student_ends_on_a_grid(tmp_path, mode):
    rtn = "  - rtn: {bits: 4, group_size: 64, symmetric: false}\n"
    run_recipe(recipe(tmp_path, rtn + distill(10240, quantized=mode, lora=LORA)), tmp_path / "out")
    stage, before = tmp_path / "out" / "2-distill", tmp_path / "out" / "1-rtn"
    quant, old = QuantState.load(stage), QuantState.load(before)
    assert off_grid(load_model(stage), quant) == []
    trained, start = load_file(str(stage / "model.safetensors")), load_file(str(before / "model.safetensors"))
    assert any(not torch.equal(trained[k + ".weight"], start[k + ".weight"]) for k in quant.targets)
    same_scales = all(torch.equal(quant.tensors[k], old.tensors[k]) for k in old.tensors)
    s = summary(tmp_path / "out")
    assert same_scales == (mode == "ste") and s["lora"]["through_grid"] == (14 if mode == "ste" else 0)
    if mode == "ste":  # the recovered stage packs like the GPTQ/RTN stage it came from
        from dscompress.export.formats import export

        packed = export(stage, tmp_path / "packed", "gptq_v2")
        assert json.loads((packed / "config.json").read_text())["quantization_config"]["checkpoint_format"] == "gptq_v2"


def test_sigkilled_lora_distillation_resumes_to_identical_bytes_from_adapter_checkpoints(tmp_path):
    stages = PRUNE + distill(20480, lora=LORA)
    run_recipe(recipe(tmp_path, stages), tmp_path / "full")
    killed = tmp_path / "killed"
    run_and_sigkill(recipe(tmp_path, stages, name="k.yaml"), killed, ".resume/2-distill-*/ckpt/state.json")
    saved = load_file(str(next(killed.glob(".resume/2-distill-*/ckpt")) / "student.safetensors"))
    assert saved and all(".lora_" in k for k in saved)  # the adapters, not the frozen student
    assert cli("run", str(tmp_path / "k.yaml"), "--out", str(killed)).returncode == 0
    assert summary(killed)["resumed_from_step"] >= 10
    full = (tmp_path / "full" / "2-distill" / "model.safetensors").read_bytes()
    assert (killed / "2-distill" / "model.safetensors").read_bytes() == full


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_lora_adapts_the_linears_of_moe_and_mla_models_and_leaves_stacked_experts_frozen(tmp_path, arch):
    rtn = "  - rtn: {bits: 4, group_size: 32, symmetric: false}\n"
    report = run_recipe(recipe(tmp_path, rtn + distill(2048, lora=LORA), model=f"tiny:{arch}"), tmp_path / "out")
    assert report["result"] == "passed"
    stage, before = tmp_path / "out" / "2-distill", tmp_path / "out" / "1-rtn"
    assert off_grid(load_model(stage), QuantState.load(stage)) == []
    trained, start = load_file(str(stage / "model.safetensors")), load_file(str(before / "model.safetensors"))
    experts = [k for k in trained if ".experts." in k and "shared" not in k]
    assert experts and all(torch.equal(trained[k], start[k]) for k in experts)
    adapted = summary(tmp_path / "out")["lora"]
    assert adapted["adapted_linears"] > 0 and adapted["through_grid"] == adapted["adapted_linears"]


def test_compiled_layers_compute_the_eager_loss_and_gradients():
    """`compile` (torch.compile per decoder layer): with LoRA adapters, a layer trained through its grid and a
    hidden-state capture hook inside the compiled layers, one graph serves every layer and the loss and adapter
    gradients equal eager ones; `eager` restores the plain modules."""
    import copy

    from dscompress.compress.distill import lora
    from dscompress.compress.distill.config import LoraSettings
    from dscompress.compress.distill.loop import compile_layers, eager
    from dscompress.compress.distill.train import Capture
    from dscompress.quant.primitives import fake_quantize

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    base = AutoModelForCausalLM.from_config(config)
    grid = QuantState("rtn", 4, 16, False)
    for i, layer in enumerate(base.model.layers):
        w0, scale, zero = fake_quantize(layer.self_attn.q_proj.weight.detach(), 4, 16, False)
        layer.self_attn.q_proj.weight.data.copy_(w0)
        grid.add(f"model.layers.{i}.self_attn.q_proj", "linear", w0.shape, scale, zero)
    ids = torch.randint(0, 128, (2, 16))
    results = []
    for compiled in (False, True):
        model = copy.deepcopy(base)
        adapters = lora.attach(model, LoraSettings(rank=4, alpha=8), seed=1, grid=grid)
        torch.manual_seed(2)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)  # adapters that move codes across rounding boundaries
        capture = Capture(model.model.layers, [1])
        if compiled:
            torch._dynamo.reset()
            assert compile_layers(model) == 3
        loss = model(input_ids=ids).logits.float().square().mean() + capture.out[1].float().square().mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
        assert len(adapters.through_grid) == 3
    if hasattr(torch._dynamo.utils, "counters"):
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys() and all(torch.allclose(grads_a[k], grads_b[k], atol=1e-5) for k in grads_a)
    assert eager(model) is model and all(m._compiled_call_impl is None for m in model.model.layers)


def test_compile_true_runs_the_stage_on_the_cpu_and_leaves_a_stock_checkpoint(tmp_path):
    run_recipe(recipe(tmp_path, PRUNE + distill(2560, compile="true")), tmp_path / "out")
    assert summary(tmp_path / "out")["compiled"] is True
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "2-distill")
    assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False).shape == (1, 6)


@pytest.mark.parametrize(
    ("setting", "device", "quant", "quantized", "expect"),
    [("auto", "cuda", None, "ste", True), ("auto", "cpu", None, "ste", False),
     ("auto", "cuda", "rtn", "ste", False), ("auto", "cuda", "rtn", "requantize", True),
     (True, "cpu", None, "ste", True), (False, "cuda", None, "ste", False)],
)  # fmt: skip
def test_compile_auto_is_on_for_gpus_except_students_trained_through_their_grid(setting, device, quant, quantized,
                                                                                  expect):  # fmt: skip
    from types import SimpleNamespace

    from dscompress.compress.distill.config import DistillConfig
    from dscompress.compress.distill.loop import compiling

    config = DistillConfig(budget={"tokens": 1}, compile=setting, quantized=quantized)
    assert compiling(SimpleNamespace(config=config, quant=quant), torch.device(device)) is expect
