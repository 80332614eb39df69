"""`gptq` pass: 4-bit (2/3/4/8) GPTQ that streams one decoder block at a time through the accelerator.

Flow, for calibration windows X:
1. Run the embeddings once and capture what decoder layer 0 receives (hidden states and its keyword arguments:
   rotary embeddings, masks), kept on the accelerator.
2. For each decoder layer k: move it to the accelerator; for each group of weights sharing one input, in
   execution order (true-sequential), run the layer over X with hooks that accumulate Hessians, then quantize the
   group. Weights sharing an input are stacked into one matrix: GPTQ treats rows independently, so the result is
   the same and the column loop runs once. Stacked experts get one Hessian per expert, from the tokens routed to
   it; an expert that saw fewer than `moe_min_tokens` tokens falls back to round-to-nearest and is counted.
3. Run the quantized layer over X: its outputs are layer k+1's inputs. Move it back to CPU. Checkpoint it.
Only one block and the activations sit on the accelerator; the rest of the model stays in CPU memory.
Dense pre-norm blocks (every layer of Llama/Qwen2/Qwen3, DeepSeek's dense layers) take a shortcut with the same
result, bit for bit: after one pass through attention, the MLP's inputs and the block's outputs are computed
from the quantized weights directly (`_quantize_dense_layer`).
"""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from safetensors.torch import load_file, save_file

from dscompress.compress.gptq_math import HessianAccumulator, gptq_quantize
from dscompress.compress.quant import fake_quantize
from dscompress.compress.rtn import WithExclude, selected
from dscompress.compress.rtn import check as rtn_check
from dscompress.context import PassOutput, StageContext
from dscompress.export.qstate import QuantState
from dscompress.models.adapters import WeightTarget


class GPTQConfig(WithExclude):
    """`gptq:` stage. Example: `{bits: 4, group_size: 64, symmetric: false, act_order: true}`."""

    bits: Literal[2, 3, 4, 8] = Field(4, description="bits per weight")
    group_size: Literal[-1, 32, 64, 128] = Field(128, description="columns per scale; -1 = per output channel")
    symmetric: bool = Field(True, description="symmetric grid (zero point 2**(bits-1)) or asymmetric")
    # On by default: measured on SmolLM2 W4 g64 it cuts KL to fp32 from 0.19 to 0.11 (docs/BENCHMARKS.md), and
    # with static groups it costs nothing at inference.
    act_order: bool = Field(True, description="visit columns by decreasing Hessian diagonal (static groups)")
    damp_frac: float = Field(0.01, gt=0, le=1, description="dampening, as a fraction of mean(diag H)")
    block_size: Literal[128, 256] = Field(128, description="columns per lazy batch update")
    true_sequential: bool = Field(True, description="re-collect inputs after each quantized group of a layer")
    batch_size: int = Field(8, ge=1, description="calibration windows per forward pass")
    moe_min_tokens: int = Field(16, ge=1, description="fewer routed tokens than this: the expert gets RTN")


# The same pre-flight rule as rtn: the group size must divide every quantized width.
check = rtn_check


KEEP_BYTES = 1 << 30  # activations the dense-block shortcut may keep instead of recomputing


class _StopForward(Exception):
    """Raised by the capture hook once layer 0's inputs are recorded."""


def capture_layer_inputs(model, adapter, windows: torch.Tensor, batch_size: int, device) -> list[tuple]:
    """[(hidden_states, kwargs)] that decoder layer 0 receives, one entry per calibration batch, on `device`."""
    layers = adapter.layers(model)
    captured: list[tuple] = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, kwargs))
        raise _StopForward

    backbone = model.get_submodule(adapter.layers_path.rsplit(".", 1)[0])
    others = [m for m in backbone.children() if m is not layers]
    for m in others:
        m.to(device)
    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, len(windows), batch_size):
            with contextlib.suppress(_StopForward):
                backbone(windows[start : start + batch_size].to(device), use_cache=False)
    finally:
        handle.remove()
        for m in others:
            m.to("cpu")
    return captured


def _run_layer(layer, batches: list[tuple]) -> list[torch.Tensor]:
    outs = []
    for hidden, kwargs in batches:
        try:
            out = layer(hidden, **kwargs)
        except _StopForward:  # a Hessian hook has what it needs; the rest of the layer is not computed
            continue
        outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


class _GroupHessians:
    """Hooks that accumulate the Hessians of one weight group while its layer runs.

    With `stop`, the hook ends the layer's forward once the group's input is recorded (true-sequential passes
    need nothing after it), so collecting q/k/v costs a norm, not a whole layer.
    """

    def __init__(self, group: list[WeightTarget], device, stop: bool = False, hooks: bool = True, keep=None):
        self.group, self.handles, self.stop, self.keep = group, [], stop, keep
        first = group[0]
        if not hooks:  # the caller feeds self.acc itself
            self.acc = HessianAccumulator(first.in_features, device)
            return
        if first.kind == "linear":
            self.acc = HessianAccumulator(first.in_features, device)
            self.handles.append(first.module.register_forward_pre_hook(self._linear_hook))
        else:
            experts, n_experts = first.module, first.param.shape[0]
            self.accs = [HessianAccumulator(first.in_features, device) for _ in range(n_experts)]
            self.handles.append(experts.register_forward_pre_hook(self._experts_hook, with_kwargs=True))

    def _experts_hook(self, module, args, kwargs):
        values = list(args) + [kwargs[k] for k in ("hidden_states", "top_k_index", "top_k_weights") if k in kwargs]
        hidden, index = values[0], values[1]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        for e, acc in enumerate(self.accs):
            rows = (index == e).any(-1)
            x = hidden[rows]
            if self.group[0].attr == "down_proj" and len(x):  # the expert's own intermediate activations
                gate, up = torch.nn.functional.linear(x, module.gate_up_proj[e]).chunk(2, dim=-1)
                x = module.act_fn(gate) * up
            acc.add(x)
        if self.stop:
            raise _StopForward

    def _linear_hook(self, module, args):
        self.acc.add(args[0])
        if self.keep is not None:  # the caller reuses these inputs instead of recomputing them
            self.keep.append(args[0])
        if self.stop:
            raise _StopForward

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _quantize_group(hess: _GroupHessians, config: GPTQConfig, state: QuantState, stats: dict) -> None:
    group = hess.group
    kw = dict(bits=config.bits, group_size=config.group_size, sym=config.symmetric, damp_frac=config.damp_frac,
              act_order=config.act_order, block_size=config.block_size)  # fmt: skip
    if group[0].kind == "linear":
        # rows are independent in GPTQ: one solve for the whole group
        stacked = torch.cat([t.param.detach() for t in group]).to(hess.acc.H.device)
        res = gptq_quantize(stacked, hess.acc.H, **kw)
        stats["rtn_fallback_weights"] += int(res.damp_used < 0)
        rows = 0
        for t in group:
            n = t.param.shape[0]
            t.param.data.copy_(res.weight[rows : rows + n].to(t.param.dtype))
            state.add(t.name, t.kind, t.param.shape, res.scale[rows : rows + n].cpu(), res.zero[rows : rows + n].cpu())
            rows += n
        return
    t = group[0]
    weights, scales, zeros = [], [], []
    for e, acc in enumerate(hess.accs):
        w = t.param[e].detach()
        if acc.n < config.moe_min_tokens:
            deq, s, z = fake_quantize(w, config.bits, config.group_size, config.symmetric)
            stats["experts_rtn_fallback"] += 1
        else:
            res = gptq_quantize(w, acc.H, **kw)
            deq, s, z = res.weight, res.scale, res.zero
            stats["rtn_fallback_weights"] += int(res.damp_used < 0)
        weights.append(deq)
        scales.append(s)
        zeros.append(z)
    t.param.data.copy_(torch.stack(weights).to(t.param.dtype))
    state.add(t.name, t.kind, t.param.shape, torch.stack(scales).cpu(), torch.stack(zeros).cpu())


def _block_path(resume_dir: Path | None, index: int) -> Path | None:
    return resume_dir / f"block-{index:04d}.safetensors" if resume_dir else None


def _save_block(path: Path, layer, state: QuantState, names: list[str]) -> None:
    tensors = {f"layer.{k}": v.detach().cpu().contiguous() for k, v in layer.state_dict().items()}
    for name in names:
        for part in ("scale", "zero"):
            tensors[f"q.{name}.{part}"] = state.tensors[f"{name}.{part}"]
    tmp = path.with_name(f".tmp-{path.name}")
    save_file(tensors, str(tmp))
    tmp.replace(path)  # atomic: a block file exists only when complete


def _load_block(path: Path, layer, state: QuantState, targets: list[WeightTarget]) -> None:
    tensors = load_file(str(path))
    layer.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("layer.")})
    for t in targets:
        state.add(t.name, t.kind, t.param.shape, tensors[f"q.{t.name}.scale"], tensors[f"q.{t.name}.zero"])


def apply(model: torch.nn.Module, config: GPTQConfig, ctx: StageContext) -> PassOutput:
    adapter, device = ctx.adapter, ctx.device
    state = QuantState("gptq", config.bits, config.group_size, config.symmetric)
    stats = {"rtn_fallback_weights": 0, "experts_rtn_fallback": 0, "blocks_resumed": 0}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if ctx.resume_dir is not None:
        ctx.resume_dir.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        batches = capture_layer_inputs(model, adapter, ctx.calibration(), config.batch_size, device)
        layers = adapter.layers(model)
        for index in ctx.track(range(len(layers)), f"gptq int{config.bits} g{config.group_size}"):
            layer = layers[index].to(device)
            groups = [g for g in (selected(g, config.exclude) for g in adapter.block_linears(model, index)) if g]
            path, outs = _block_path(ctx.resume_dir, index), None
            if path is not None and path.exists():
                _load_block(path, layer, state, [t for g in groups for t in g])
                stats["blocks_resumed"] += 1
            else:
                parts = _dense_parts(adapter, model, index, groups) if config.true_sequential else None
                if parts is not None:
                    outs = _quantize_dense_layer(layer, groups, batches, parts, config, state, stats)
                else:
                    _quantize_layer(layer, groups, batches, config, state, stats)
                if path is not None:
                    _save_block(path, layer, state, [t.name for g in groups for t in g])
            if outs is None:
                outs = _run_layer(layer, batches)
            batches = [(out, kwargs) for out, (_, kwargs) in zip(outs, batches, strict=True)]
            layers[index] = layer.to("cpu")
        _quantize_lm_head(model, adapter, batches, config, state, stats)
    stats["peak_accelerator_bytes"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    stats["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    stats["quantized_weights"] = len(state.targets)
    stats["calibration_tokens"] = int(ctx.calibration().numel())
    return PassOutput(model, quant=state, summary=stats)


def _quantize_layer(layer, groups, batches, config: GPTQConfig, state: QuantState, stats: dict) -> None:
    if config.true_sequential:
        for group in groups:
            hess = _GroupHessians(group, batches[0][0].device, stop=True)
            _run_layer(layer, batches)
            hess.remove()
            _quantize_group(hess, config, state, stats)
        return
    hessians = [_GroupHessians(group, batches[0][0].device) for group in groups]
    _run_layer(layer, batches)
    for hess in hessians:
        hess.remove()
        _quantize_group(hess, config, state, stats)


def _dense_parts(adapter, model, index: int, groups: list[list[WeightTarget]]):
    """(o group, gate/up group, down group, post-attention norm, mlp) for a pre-norm block with a dense gated MLP
    whose o_proj and MLP projections are all being quantized; None otherwise (MoE layers, exclusions)."""
    if adapter.is_moe_layer(model.config, index):
        return None
    by_leaf = {t.name.rsplit(".", 1)[-1]: g for g in groups for t in g}
    if not all(k in by_leaf for k in ("o_proj", "gate_proj", "up_proj", "down_proj")):
        return None
    layer = adapter.layers(model)[index]
    post_norm = layer.get_submodule(adapter.post_attn_norm_path)
    return (
        by_leaf["o_proj"],
        by_leaf["gate_proj"],
        by_leaf["down_proj"],
        post_norm,
        layer.get_submodule(adapter.mlp_path),
    )


def _quantize_dense_layer(layer, groups, batches, parts, config: GPTQConfig, state: QuantState, stats: dict):
    """True-sequential GPTQ of a dense pre-norm block with one attention pass instead of four layer passes.

    The block computes h = x + o_proj(attn(norm1(x))); out = h + down(act(gate(norm2(h))) * up(norm2(h))).
    Once o_proj's inputs are recorded (the only part that needs attention), everything after it is a few
    matrix products, so the MLP's Hessians and the block's outputs come from the quantized weights directly.
    Returns the block's outputs (the next block's inputs).
    """
    o_group, mlp_group, down_group, post_norm, mlp = parts
    device = batches[0][0].device
    for group in groups[: groups.index(o_group)]:  # attention projections before o_proj: as usual
        hess = _GroupHessians(group, device, stop=True)
        _run_layer(layer, batches)
        hess.remove()
        _quantize_group(hess, config, state, stats)
    attn_out: list[torch.Tensor] = []
    hess = _GroupHessians(o_group, device, stop=True, keep=attn_out)
    _run_layer(layer, batches)
    hess.remove()
    _quantize_group(hess, config, state, stats)
    o_proj = o_group[0].module
    residual = [hidden + o_proj(x) for (hidden, _), x in zip(batches, attn_out, strict=True)]
    del attn_out
    mlp_in = [post_norm(h) for h in residual]
    hess = _GroupHessians(mlp_group, device, hooks=False)
    for x in mlp_in:
        hess.acc.add(x)
    _quantize_group(hess, config, state, stats)
    hess = _GroupHessians(down_group, device, hooks=False)
    # (B, T, intermediate) per batch is the largest activation: kept when small, else recomputed for the outputs
    tokens = sum(x[..., 0].numel() for x in mlp_in)
    keep = tokens * down_group[0].in_features * mlp_in[0].element_size() <= KEEP_BYTES
    down_in = []
    for x in mlp_in:
        y = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
        hess.acc.add(y)
        down_in.append(y if keep else None)
    _quantize_group(hess, config, state, stats)
    return [
        h + mlp.down_proj(y if y is not None else mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
        for h, x, y in zip(residual, mlp_in, down_in, strict=True)
    ]


def _quantize_lm_head(model, adapter, batches, config: GPTQConfig, state: QuantState, stats: dict) -> None:
    """lm_head (only when `exclude` no longer lists it): its input is the final norm of the last layer's output."""
    head = WeightTarget(adapter.lm_head_path, model.get_submodule(adapter.lm_head_path), "weight", "linear", -1)
    if not selected([head], config.exclude):
        return
    norm = model.get_submodule(adapter.final_norm_path).to(batches[0][0].device)
    hess = _GroupHessians([head], batches[0][0].device, hooks=False)
    for hidden, _ in batches:
        hess.acc.add(norm(hidden))
    norm.to("cpu")
    _quantize_group(hess, config, state, stats)
