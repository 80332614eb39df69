import math

import torch
from safetensors.torch import load_file

from dscompress.calibrate.metrics import (
    BASELINE_FILE,
    BaselineRef,
    StreamingSafetensors,
    compute_baseline,
    evaluate,
)
from dscompress.models.load import load_model
from dscompress.models.sources import resolve
from dscompress.quant.primitives import fake_quantize

CPU = torch.device("cpu")


def test_streaming_writer_produces_a_standard_safetensors_file(tmp_path):
    a = torch.randn(5, 3, 7).half()
    b = torch.arange(15, dtype=torch.int32).reshape(5, 3)
    w = StreamingSafetensors(tmp_path / "x.safetensors", {"a": (torch.float16, (5, 3, 7)), "b": (torch.int32, (5, 3))})
    w.write(a[:2])
    w.write(a[2:])
    w.write(b)
    w.close()
    back = load_file(str(tmp_path / "x.safetensors"))
    assert torch.equal(back["a"], a) and torch.equal(back["b"], b)


def test_identical_model_scores_zero_kl_and_full_agreement(tmp_path):
    model = load_model(resolve("tiny:qwen2").directory)
    windows = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(0))
    base = compute_baseline(model, windows, batch_size=2, device=CPU, directory=tmp_path)
    again = evaluate(model, windows, BaselineRef(tmp_path), batch_size=3, device=CPU)
    assert again["kl"] < 1e-6 and again["top1"] == 1.0
    assert math.isclose(again["perplexity"], base["perplexity"], rel_tol=1e-9)
    with torch.no_grad():
        logits = model(windows).logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert math.isclose(base["perplexity"], math.exp(float(ce)), rel_tol=1e-5)
    assert (tmp_path / BASELINE_FILE).stat().st_size > 3 * 31 * (320 * 2 + 4)


def test_kl_and_top1_match_a_float64_reference(tmp_path):
    model = load_model(resolve("tiny:llama").directory)
    windows = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    compute_baseline(model, windows, batch_size=2, device=CPU, directory=tmp_path)
    with torch.no_grad():
        logp = torch.log_softmax(model(windows).logits[:, :-1].double(), -1)
        for module in model.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(fake_quantize(module.weight, 2, 32, False)[0])
        logq = torch.log_softmax(model(windows).logits[:, :-1].double(), -1)
    metrics = evaluate(model, windows, BaselineRef(tmp_path), batch_size=1, device=CPU)
    exact = float((logp.exp() * (logp - logq)).sum(-1).mean())
    agree = float((logp.argmax(-1) == logq.argmax(-1)).double().mean())
    assert exact > 1e-3  # a real perturbation, not a trivial zero
    assert abs(metrics["kl"] - exact) < 1e-3 * exact + 1e-6, (metrics["kl"], exact)
    assert metrics["top1"] == agree
