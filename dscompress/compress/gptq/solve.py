"""GPTQ in one process: 4-bit (2/3/4/8) GPTQ that streams one decoder block at a time through the accelerator.

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
With `awq`, each block's AWQ scales are searched and folded in first (awq.py). With `gptaq`, a float copy of
each block runs beside it on the float model's inputs, and each group is solved towards the float outputs
(gptaq.py; the generic per-group passes, not the dense shortcut).
With `devices` > 1 the same `quantize` runs in one worker process per device, each on its share of the windows,
exchanging Hessians and solved rows or experts (dist.py, ranks.py); apply.py chooses.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dscompress.compress.gptq.awq import scale_block
from dscompress.compress.gptq.batched import batchable, gptq_quantize_batched
from dscompress.compress.gptq.blocks import block_path, load_block, save_block
from dscompress.compress.gptq.config import GPTQConfig
from dscompress.compress.gptq.gptaq import CrossAccumulator, FloatTwin, capture_input, shift_target
from dscompress.compress.gptq.hessians import GroupHessians
from dscompress.compress.gptq.math import HessianAccumulator, gptq_quantize
from dscompress.compress.gptq.ranks import SingleRank
from dscompress.compress.layerwise import capture_layer_inputs, run_layer
from dscompress.compress.selection import selected
from dscompress.context import PassOutput, StageContext
from dscompress.errors import RecipeError
from dscompress.models.adapters import WeightTarget
from dscompress.models.stream import stream_of
from dscompress.quant.primitives import fake_quantize, n_groups
from dscompress.quant.qstate import QuantState

KEEP_BYTES = 1 << 30  # activations the dense-block shortcut may keep instead of recomputing
# The Hessians of one stacked expert group take n_experts x in^2 x 4 bytes (DeepSeek-V3's 256 experts x 7168^2:
# 52 GB). They are accumulated and solved in chunks of experts that fit this share of the accelerator's free
# memory (on a CPU, EXPERT_CPU_BUDGET). Each chunk reruns the layer up to the experts: exact, since an expert's
# inputs do not depend on other experts' weights.
# Measured on an H200 with the fused kernel, DeepSeek-V3 widths (1 dense + 1 MoE, 32 x 512): 0.06 -> 39.3 GiB peak
# in 51.2 s; 0.07 -> 40.4 GiB, 55.4 s; 0.08 -> 40.7 GiB, 49.8 s (older solver: 0.25 -> 61 GiB).
EXPERT_MEMORY_SHARE = 0.06
EXPERT_CPU_BUDGET = 8 << 30


@dataclass
class _Run:
    """What every step of one GPTQ pass shares: the settings, the grid being built, counters and the ranks."""

    config: GPTQConfig
    state: QuantState
    stats: dict
    comm: SingleRank
    grids: dict = field(default_factory=dict)  # stacked group -> {expert: (scale, zero)} while it is solved
    layer: int = -1  # the decoder block being solved
    layer_loss: dict = field(default_factory=dict)  # block -> GPTQ's loss proxy summed over its solves (this rank)
    layer_peaks: list = field(default_factory=list)  # block -> {phase: accelerator peak bytes}
    peak: int = 0  # accelerator peak over the whole pass
    high: dict = field(default_factory=dict)  # bits_budget: weight name -> its own bits (the rest: config.bits)
    twin: FloatTwin | None = None  # gptaq: the float model's side of the calibration

    def phase_peak(self, device: torch.device, phase: str) -> None:
        """The accelerator's peak since the last phase, kept for the current block; the pass's own peak."""
        if device.type != "cuda":
            return
        peak = torch.cuda.max_memory_allocated(device)
        self.peak = max(self.peak, peak)
        if self.layer_peaks and phase != "lm_head":
            self.layer_peaks[-1][phase] = peak
        torch.cuda.reset_peak_memory_stats(device)

    def add_loss(self, loss: float) -> None:
        if math.isfinite(loss):  # an RTN fallback has no GPTQ loss
            self.layer_loss[self.layer] = self.layer_loss.get(self.layer, 0.0) + loss

    @property
    def fast(self) -> bool:
        """kernel auto: half-precision activations make their Hessians on tensor cores, static grids are solved
        by the fused block kernel (each where the device supports it); torch: float32 GEMMs and the eager loop."""
        return self.config.kernel == "auto"

    def solver_args(self, bits: int | None = None) -> dict:
        c = self.config
        return dict(bits=bits or c.bits, group_size=c.group_size, sym=c.symmetric, damp_frac=c.damp_frac,
                    act_order=c.act_order, block_size=c.block_size, kernel=c.kernel,
                    clip_search=c.clip_search)  # fmt: skip


def _quantize_group(hess: GroupHessians, run: _Run) -> None:
    if hess.group[0].kind == "linear":
        _quantize_linears(hess.group, run.comm.reduce(hess.acc), run)
    else:
        _quantize_experts(hess.group[0], {e: run.comm.reduce(acc) for e, acc in hess.accs.items()}, run)


def _expert_budget(device: torch.device) -> float:
    return EXPERT_MEMORY_SHARE * torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else EXPERT_CPU_BUDGET


def expert_chunk(t: WeightTarget, device: torch.device, comm: SingleRank) -> int:
    """How many experts' Hessians of stacked group `t` to hold at once (the same on every rank)."""
    chunk = max(1, min(t.param.shape[0], int(_expert_budget(device) // (4 * t.in_features**2))))
    return -comm.max(-chunk)  # the smallest over ranks


def _solve_experts(t: WeightTarget, mine: list[int], accs: dict[int, HessianAccumulator], run: _Run) -> dict:
    """{expert: (weight, scale, zero, fallback flag)} for this rank's experts: batched solves (one kernel per
    column step for a whole batch) where the grids are static, sized so about six Hessian-sized and four
    weight-sized work tensors per expert fit the budget; one by one otherwise."""
    args, results = run.solver_args(), {}
    out_f, in_f = t.param.shape[1], t.param.shape[2]
    per_expert = 4 * (6 * in_f**2 + 4 * out_f * in_f)
    step = max(1, int(_expert_budget(accs[mine[0]].H.device) // per_expert)) if mine else 1
    if not batchable(args["act_order"], args["group_size"]):
        step = 1
    for start in range(0, len(mine), step):
        batch = mine[start : start + step]
        W = torch.stack([t.param[e].detach() for e in batch])
        H = torch.stack([accs[e].H for e in batch])
        for e in batch:
            accs[e].H = None  # the stacked copy is consumed by the solve
        if len(batch) == 1 and step == 1:
            found = [gptq_quantize(W[0], H[0], **args)]
        else:
            found = gptq_quantize_batched(W, H, **args)
        del W, H
        for e, res in zip(batch, found, strict=True):
            results[e] = (res.weight, res.scale, res.zero, float(res.damp_used < 0))
            run.add_loss(res.error)
    return results


def _quantize_linears(group: list[WeightTarget], acc: HessianAccumulator, run: _Run) -> None:
    """One solve per bit width in the group (rows are independent in GPTQ, so a shared Hessian serves q/k/v
    together); with several ranks each solves a slice of the rows against the same Hessian and the slices are
    exchanged."""
    widths = sorted({run.high.get(t.name, run.config.bits) for t in group})
    for i, bits in enumerate(widths):
        part = [t for t in group if run.high.get(t.name, run.config.bits) == bits]
        _solve_linears(part, acc.copy() if i < len(widths) - 1 else acc, run, bits)  # the last width consumes H


def _solve_linears(group: list[WeightTarget], acc: HessianAccumulator, run: _Run, bits: int) -> None:
    stacked = torch.cat([t.param.detach() for t in group]).to(acc.H.device)
    bounds = run.comm.slices(len(stacked))
    lo, hi = bounds[run.comm.rank]
    res = gptq_quantize(stacked[lo:hi], acc, **run.solver_args(bits))  # takes acc.H: freed as the solve goes
    run.add_loss(res.error)
    run.stats["rtn_fallback_weights"] += int(res.damp_used < 0)  # the same Hessian, so the same on every rank
    weight, scale, zero = _full_rows(res, len(stacked), bounds, run.comm)
    rows = 0
    for t in group:
        n = t.param.shape[0]
        t.param.data.copy_(weight[rows : rows + n].to(t.param.dtype))
        scale_rows, zero_rows = scale[rows : rows + n].cpu(), zero[rows : rows + n].cpu()
        run.state.add(t.name, t.kind, t.param.shape, scale_rows, zero_rows, bits)
        rows += n


def _full_rows(res, n: int, bounds: list[tuple[int, int]], comm: SingleRank):
    if comm.world == 1:
        return res.weight, res.scale, res.zero
    weight = torch.empty(n, res.weight.shape[1], device=res.weight.device)
    scale = torch.empty(n, res.scale.shape[1], device=res.weight.device)
    zero = torch.empty(n, res.zero.shape[1], device=res.weight.device, dtype=torch.int32)
    lo, hi = bounds[comm.rank]
    weight[lo:hi], scale[lo:hi], zero[lo:hi] = res.weight, res.scale, res.zero
    for src, (a, b) in enumerate(bounds):
        comm.broadcast([weight[a:b], scale[a:b], zero[a:b]], src)
    return weight, scale, zero


def _quantize_experts(t: WeightTarget, accs: dict[int, HessianAccumulator], run: _Run) -> None:
    """Stacked experts (a chunk of them), one Hessian each (from the tokens routed to it). Expert e is solved by
    rank e % ranks: every rank solves its experts first, then all exchange, so the solves run side by side.
    Each result goes straight into the stacked parameter; its grid into `run.grids` until the group is complete."""
    config, comm = run.config, run.comm
    results, solved = {}, []
    for e, acc in accs.items():
        if acc.n < config.moe_min_tokens:  # acc.n counts every rank's tokens: all ranks agree
            results[e] = (*fake_quantize(t.param[e].detach(), config.bits, config.group_size, config.symmetric), 0.0)
            run.stats["experts_rtn_fallback"] += 1
            continue
        solved.append(e)
    mine = [e for e in solved if e % comm.world == comm.rank]
    for e in solved:
        if e not in mine:
            accs[e].H = None  # another rank solves it
    results |= _solve_experts(t, mine, accs, run)
    for e in solved:
        results[e] = _exchange_expert(t, e, results.get(e), run)
        run.stats["rtn_fallback_weights"] += int(results[e][3])
    grids = run.grids.setdefault(t.name, {})
    for e in sorted(results):
        weight, scale, zero, _ = results.pop(e)
        t.param.data[e].copy_(weight.to(t.param.dtype))
        grids[e] = (scale.cpu(), zero.cpu())
    if len(grids) == t.param.shape[0]:
        del run.grids[t.name]
        scales, zeros = (torch.stack([grids[e][i] for e in range(len(grids))]) for i in range(2))
        run.state.add(t.name, t.kind, t.param.shape, scales, zeros)


def _exchange_expert(t: WeightTarget, e: int, mine: tuple | None, run: _Run) -> tuple:
    """Expert e's (weight, scale, zero, fallback flag) on every rank, sent by the rank that solved it."""
    if run.comm.world == 1:
        return mine
    w = t.param[e]
    g = n_groups(w.shape[-1], run.config.group_size)
    if mine is None:
        mine = (torch.empty(w.shape, device=w.device), torch.empty(w.shape[0], g, device=w.device),
                torch.empty(w.shape[0], g, device=w.device, dtype=torch.int32), 0.0)  # fmt: skip
    flag = torch.tensor([mine[3]], device=w.device)
    run.comm.broadcast([mine[0], mine[1], mine[2], flag], e % run.comm.world)
    return (*mine[:3], float(flag.item()))


def quantize(model: torch.nn.Module, config: GPTQConfig, ctx: StageContext, comm: SingleRank,
             high: dict | None = None) -> PassOutput:  # fmt: skip
    """The pass in this process; with several ranks, on this rank's share of the calibration windows. `high`:
    weights solved at their own bits (bits_budget's choice)."""
    adapter, device = ctx.adapter, ctx.device
    run = _Run(config, QuantState("gptq", config.bits, config.group_size, config.symmetric),
               {"rtn_fallback_weights": 0, "experts_rtn_fallback": 0, "blocks_resumed": 0}, comm,
               high=high or {})  # fmt: skip
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if ctx.resume_dir is not None and comm.rank == 0:
        ctx.resume_dir.mkdir(parents=True, exist_ok=True)
    windows, started, stream = ctx.calibration(), time.perf_counter(), stream_of(model)
    if stream is not None and ctx.output_dir is None and comm.rank == 0:
        raise RecipeError("gptq on a streamed model (model.stream: true) needs a stage folder to write layers to")
    with torch.no_grad():
        batches = capture_layer_inputs(model, adapter, windows.tensor_split(comm.world)[comm.rank],
                                       config.batch_size, device)  # fmt: skip
        layers = adapter.layers(model)
        run.twin = FloatTwin(batches) if config.gptaq else None
        layer_seconds, io_seconds = [], {"read": 0.0, "store": 0.0}
        for index in ctx.track(range(len(layers)), f"gptq int{config.bits} g{config.group_size}"):
            run.layer_peaks.append({})
            layer_started = time.perf_counter()
            layer = stream.onload(index, device) if stream else layers[index].to(device)
            run.phase_peak(device, "load")
            io_seconds["read"] += time.perf_counter() - layer_started
            outs = _quantize_block(model, adapter, index, layer, batches, run, block_path(ctx.resume_dir, index))
            if outs is None:
                outs = run_layer(layer, batches)
            batches = [(out, kwargs) for out, (_, kwargs) in zip(outs, batches, strict=True)]
            if run.twin is not None:
                run.twin.advance()
            run.phase_peak(device, "solve")
            stored = time.perf_counter()
            if stream is None:
                layers[index] = layer.to("cpu")
            elif comm.rank == 0:  # to the stage's own shard; read from there from now on
                stream.write_layer(index, ctx.output_dir)
            else:
                stream.release(index)
            run.phase_peak(device, "store")
            io_seconds["store"] += time.perf_counter() - stored
            layer_seconds.append(round(time.perf_counter() - layer_started, 2))  # the store synchronized
        if stream is not None:
            flushed = time.perf_counter()
            stream.flush()  # the last layer's shard, written in the background
            io_seconds["store"] += time.perf_counter() - flushed
        _quantize_lm_head(model, adapter, batches, run)
    run.phase_peak(device, "lm_head")
    run.stats["peak_accelerator_bytes"] = comm.max(run.peak)  # per device: the largest
    # per block, this rank's accelerator peak while it was read, solved and stored (GiB; none on a CPU)
    run.stats["layer_peak_accelerator_gib"] = [{k: round(v / 2**30, 3) for k, v in p.items()} for p in run.layer_peaks]
    run.stats["layer_seconds"] = layer_seconds  # per decoder block: read, calibrate, solve, store
    run.stats["io_seconds"] = {k: round(v, 2) for k, v in io_seconds.items()}  # reading / storing blocks, summed
    run.stats["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    run.stats["quantized_weights"] = len(run.state.targets)
    # per decoder block, sum over its weights of (w - q)^2 / Hinv_cc^2 (rank 0's rows and experts; None: resumed)
    run.stats["layer_loss"] = [run.layer_loss.get(i) for i in range(len(layers))]
    run.stats["calibration_tokens"] = int(windows.numel())
    run.stats["devices"] = comm.world
    run.stats["pass_seconds"] = round(time.perf_counter() - started, 2)  # inside this process (worker)
    return PassOutput(model, quant=run.state, summary=run.stats)


def _quantize_block(model, adapter, index: int, layer, batches, run: _Run, path: Path | None):
    """Quantize (or resume) decoder block `index`; returns its outputs when the dense shortcut computed them."""
    run.layer = index
    groups = [g for g in (selected(g, run.config.exclude) for g in adapter.block_linears(model, index)) if g]
    resumed = run.comm.agree(path is not None and path.exists())  # rank 0 decides: every rank loads that file
    # AWQ keeps the float block's function; it reruns on a resumed block only for the float twin, whose copy is
    # then the same scaled block (and its outputs the same bits) as in the uninterrupted run
    if run.config.awq and (not resumed or run.twin is not None):
        run.stats.setdefault("awq_exponents", {}).update(
            scale_block(model, adapter, index, layer, batches, run.config, lambda n: run.high.get(n, run.config.bits))
        )
    if run.twin is not None:
        run.twin.start(layer)  # the float block (with AWQ's scales, when the block is solved here)
    if resumed:
        load_block(path, layer, run.state, [t for g in groups for t in g], run.high)
        run.stats["blocks_resumed"] += 1
        return None
    parts = _dense_parts(adapter, model, index, groups) if run.config.true_sequential else None
    outs = None
    if run.twin is not None:
        _quantize_layer_gptaq(layer, groups, batches, run)
    elif parts is not None:
        outs = _quantize_dense_layer(layer, groups, batches, parts, run)
    else:
        _quantize_layer(layer, groups, batches, run)
    if path is not None and run.comm.rank == 0:
        save_block(path, layer, run.state, [t.name for g in groups for t in g])
    return outs


def _quantize_layer(layer, groups, batches, run: _Run) -> None:
    device = batches[0][0].device
    if run.config.true_sequential:
        for group in groups:
            _solve_in_turn(layer, group, batches, run)
        return
    # Every Hessian from the float layer: dense groups are recorded on the first pass and quantized last; the
    # experts come one chunk (the same experts in every stacked group) per pass, quantized after their pass.
    dense = [GroupHessians(g, device, fast=run.fast) for g in groups if g[0].kind == "linear"]
    stacked = [g for g in groups if g[0].kind != "linear"]
    chunk = min((expert_chunk(g[0], device, run.comm) for g in stacked), default=1)
    n_experts = max((g[0].param.shape[0] for g in stacked), default=1)
    for start in range(0, n_experts, chunk):
        experts = range(start, min(start + chunk, n_experts))
        hessians = [GroupHessians(g, device, experts=experts, fast=run.fast) for g in stacked]
        run_layer(layer, batches)
        for hess in (*hessians, *(dense if start == 0 else ())):
            hess.remove()
        for hess in hessians:
            _quantize_group(hess, run)
    for hess in dense:
        _quantize_group(hess, run)


def _quantize_layer_gptaq(layer, groups, batches, run: _Run) -> None:
    """GPTAQ (gptaq.py), true-sequential: per group, batch by batch, the inputs of the block being solved and of
    the float block; the group's weights move to the asymmetric target, then GPTQ's own solve. Expert stacks
    are solved as plain GPTQ (counted in the report)."""
    device = batches[0][0].device
    for group in groups:
        if group[0].kind != "linear":  # stacked experts: plain GPTQ (each expert sees only its routed tokens)
            run.stats["gptaq_plain_expert_groups"] = run.stats.get("gptaq_plain_expert_groups", 0) + 1
            _solve_in_turn(layer, group, batches, run)
            continue
        hess = GroupHessians(group, device, hooks=False, fast=run.fast)
        cross = CrossAccumulator(group[0].in_features, device)
        for i, batch in enumerate(batches):
            x = capture_input(layer, group[0].module, batch)
            hess.acc.add(x)
            cross.add(run.twin.inputs(group[0].module, i), x)
        _shift_group(group, hess.acc.H, cross, run)
        _quantize_group(hess, run)


def _shift_group(group: list[WeightTarget], H: torch.Tensor, cross: CrossAccumulator, run: _Run) -> None:
    """The group's weights, stacked, moved to GPTAQ's target (one factorization of H for all of them)."""
    stacked = torch.cat([t.param.detach().to(H.device) for t in group])
    target = shift_target(stacked, H, cross, run.config.damp_frac, run.config.gptaq)
    rows = 0
    for t in group:
        n = t.param.shape[0]
        t.param.data.copy_(target[rows : rows + n].to(t.param.dtype))
        rows += n


def _solve_in_turn(layer, group: list[WeightTarget], batches, run: _Run) -> None:
    """True-sequential GPTQ of one group: its Hessians from the layer as solved so far, then its solve."""
    device = batches[0][0].device
    for experts in _expert_chunks(group, device, run):
        hess = GroupHessians(group, device, stop=True, experts=experts, fast=run.fast)
        run_layer(layer, batches)
        hess.remove()
        _quantize_group(hess, run)


def _expert_chunks(group: list[WeightTarget], device, run: _Run) -> list[range | None]:
    """[None] for a dense group; for stacked experts, ranges of experts whose Hessians fit at once."""
    if group[0].kind == "linear":
        return [None]
    n, chunk = group[0].param.shape[0], expert_chunk(group[0], device, run.comm)
    return [range(a, min(a + chunk, n)) for a in range(0, n, chunk)]


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


def _quantize_dense_layer(layer, groups, batches, parts, run: _Run):
    """True-sequential GPTQ of a dense pre-norm block with one attention pass instead of four layer passes.

    The block computes h = x + o_proj(attn(norm1(x))); out = h + down(act(gate(norm2(h))) * up(norm2(h))).
    Once o_proj's inputs are recorded (the only part that needs attention), everything after it is a few
    matrix products, so the MLP's Hessians and the block's outputs come from the quantized weights directly.
    Returns the block's outputs (the next block's inputs).
    """
    o_group, mlp_group, down_group, post_norm, mlp = parts
    device = batches[0][0].device
    for group in groups[: groups.index(o_group)]:  # attention projections before o_proj: as usual
        hess = GroupHessians(group, device, stop=True, fast=run.fast)
        run_layer(layer, batches)
        hess.remove()
        _quantize_group(hess, run)
    attn_out: list[torch.Tensor] = []
    hess = GroupHessians(o_group, device, stop=True, keep=attn_out, fast=run.fast)
    run_layer(layer, batches)
    hess.remove()
    _quantize_group(hess, run)
    o_proj = o_group[0].module
    residual = [hidden + o_proj(x) for (hidden, _), x in zip(batches, attn_out, strict=True)]
    del attn_out
    for i, (_, kwargs) in enumerate(batches):  # the block's inputs are not read again (the outputs build on
        batches[i] = (None, kwargs)  # `residual`): freed before the MLP's solves; the caller keeps the kwargs
    # post_norm(h) is recomputed where needed rather than kept: one activation-sized list less at the peak
    hess = GroupHessians(mlp_group, device, hooks=False, fast=run.fast)
    for h in residual:
        hess.acc.add(post_norm(h))
    _quantize_group(hess, run)
    hess = GroupHessians(down_group, device, hooks=False, fast=run.fast)
    # (B, T, intermediate) per batch is the largest activation: kept when small, else recomputed for the outputs
    tokens = sum(h[..., 0].numel() for h in residual)
    keep = tokens * down_group[0].in_features * residual[0].element_size() <= KEEP_BYTES
    down_in = []
    for h in residual:
        y = _mlp_hidden(mlp, post_norm(h))
        hess.acc.add(y)
        down_in.append(y if keep else None)
    _quantize_group(hess, run)
    return [
        h + mlp.down_proj(y if y is not None else _mlp_hidden(mlp, post_norm(h)))
        for h, y in zip(residual, down_in, strict=True)
    ]


def _mlp_hidden(mlp, x: torch.Tensor) -> torch.Tensor:
    return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)


def _quantize_lm_head(model, adapter, batches, run: _Run) -> None:
    """lm_head (only when `exclude` no longer lists it): its input is the final norm of the last layer's output."""
    run.layer = -1  # not a decoder block: its loss stays out of layer_loss
    head = WeightTarget(adapter.lm_head_path, model.get_submodule(adapter.lm_head_path), "weight", "linear", -1)
    if not selected([head], run.config.exclude):
        return
    device = batches[0][0].device
    norm = model.get_submodule(adapter.final_norm_path).to(device)
    hess = GroupHessians([head], device, hooks=False, fast=run.fast)
    cross = CrossAccumulator(head.in_features, device) if run.twin is not None else None
    for i, (hidden, _) in enumerate(batches):
        hess.acc.add(norm(hidden))
        if cross is not None:  # the float model's final hidden states, through the same (unquantized) norm
            cross.add(norm(run.twin.batches[i][0]), norm(hidden))
    norm.to("cpu")
    if cross is not None:
        _shift_group([head], hess.acc.H, cross, run)
    _quantize_group(hess, run)
