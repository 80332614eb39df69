"""`bits_budget`: which weights a GPTQ pass keeps at 8 bits, the rest at the stage's `bits`.

Sensitivity is measured where it matters, at the model's output: each Linear alone is rounded to the low grid (RTN,
the stage's group size and symmetry) in the float model and the KL divergence of the next-token distribution to
the float model's is taken on a few calibration windows. Weights are then promoted to 8 bits by the largest KL per
extra stored bit (a greedy knapsack) while the average over every quantized weight, group scales and zero points
included, stays within the budget. MoE expert stacks stay at the low bits (one grid per stack). The float input of
every decoder layer is kept, so a weight in layer i costs the layers from i on, not a whole forward.
"""

from __future__ import annotations

import time

import torch

from dscompress.compress.gptq.config import HIGH_BITS, GPTQConfig
from dscompress.compress.layerwise import capture_layer_inputs, run_layer
from dscompress.compress.selection import selected
from dscompress.context import StageContext
from dscompress.models.adapters import WeightTarget
from dscompress.quant.primitives import fake_quantize
from dscompress.quant.qstate import quantized_bytes

WINDOWS, TOKENS = 1, 256  # the calibration text each sensitivity is measured on


def allocate(model: torch.nn.Module, config: GPTQConfig, ctx: StageContext) -> tuple[dict[str, int], dict]:
    """({weight name: bits} for the promoted weights, the report's summary of the choice)."""
    started = time.perf_counter()
    targets = selected(list(ctx.adapter.weight_targets(model)), config.exclude)
    linears = [t for t in targets if t.kind == "linear"]
    home = next(model.parameters()).device
    model.to(ctx.device)
    try:
        scores = _sensitivities(model, linears, config, ctx)
    finally:
        model.to(home)
    cost = {t.name: _stored_bits(t, HIGH_BITS, config) - _stored_bits(t, config.bits, config) for t in linears}
    total = sum(t.param.numel() for t in targets)
    spent = sum(_stored_bits(t, config.bits, config) for t in targets)
    limit = config.bits_budget * total
    promoted = {}
    for name in sorted(cost, key=lambda n: scores[n] / cost[n], reverse=True):
        if spent + cost[name] <= limit:
            promoted[name] = HIGH_BITS
            spent += cost[name]
    ranked = sorted(scores.items(), key=lambda kv: kv[1], reverse=True)
    summary = {
        "bits_budget": config.bits_budget,
        "average_bits": round(spent / total, 4),
        "low_bits": config.bits,
        "high_bits": HIGH_BITS,
        "weights_at_high_bits": sorted(promoted),
        "params_at_high_bits": sum(t.param.numel() for t in linears if t.name in promoted),
        "params_quantized": total,
        "sensitivity": f"KL to the float model with the weight alone at {config.bits}-bit RTN, {WINDOWS} x "
        f"{TOKENS} calibration tokens",
        "most_sensitive": [[name, round(kl, 6)] for name, kl in ranked[:12]],
        "seconds": round(time.perf_counter() - started, 1),
    }
    return promoted, summary


def _stored_bits(t: WeightTarget, bits: int, config: GPTQConfig) -> float:
    return quantized_bytes(t.param.numel(), bits, config.group_size, t.in_features) * 8


def _sensitivities(model, linears: list[WeightTarget], config: GPTQConfig, ctx: StageContext) -> dict[str, float]:
    """KL per weight. Every decoder layer's float input is kept, so a weight in layer i reruns layers i.. only."""
    adapter, device = ctx.adapter, ctx.device
    windows = ctx.calibration()[:WINDOWS, :TOKENS]
    layers = adapter.layers(model)
    with torch.no_grad():
        [(hidden, kwargs)] = capture_layer_inputs(model, adapter, windows, len(windows), device)
        norm, head = model.get_submodule(adapter.final_norm_path), model.get_submodule(adapter.lm_head_path)
        norm.to(device), head.to(device)  # capture_layer_inputs leaves the backbone's other modules on the CPU

        def tail(start: int, h: torch.Tensor) -> torch.Tensor:
            for layer in layers[start:]:
                h = run_layer(layer, [(h, kwargs)])[0]
            return torch.log_softmax(head(norm(h)).float(), -1)

        inputs = []
        for layer in layers:
            inputs.append(hidden)
            hidden = run_layer(layer, [(hidden, kwargs)])[0]
        inputs.append(hidden)  # lm_head's: the last layer's output
        reference = tail(len(layers), hidden)
        probs = reference.exp()
        scores = {}
        for t in ctx.track(linears, "bits_budget: sensitivity per weight"):
            kept = t.param.detach().clone()
            grid = fake_quantize(kept.float(), config.bits, config.group_size, config.symmetric)[0]
            t.param.data.copy_(grid.to(kept.dtype))
            if t.layer < 0 and adapter.tied_embeddings(model):  # the embedding is the same tensor: from the start
                logp = tail(0, model.get_submodule(adapter.embed_path).to(device)(windows.to(device)))
            else:
                start = t.layer if t.layer >= 0 else len(layers)
                logp = tail(start, inputs[start])
            scores[t.name] = float((probs * (reference - logp)).sum(-1).mean())
            t.param.data.copy_(kept)
    return scores
