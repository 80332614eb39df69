"""The gptq pass's accelerator memory at its peak, predicted from shapes alone (`dscompress plan`, and
bench/bench_gptq_gpu.py beside the measured peak).

What one device holds (solve.py): one decoder block in the model's dtype; the block's inputs and, from the
attention output on, the residual stream (the inputs are freed once the residual exists, so about two
activation-sized tensors); the widest solve: two (in, in) float32 matrices (the Hessian, then its inverse and its
Cholesky factor, math.inverse_hessian_factor) and three float32 copies of the stacked weight rows; and, per
calibration batch, the MLP's intermediate activations. An MoE block adds its expert budget: the Hessians of one
chunk of experts plus the batched solve's work tensors, each sized to EXPERT_MEMORY_SHARE of the free memory.
`awq` adds, before the solve, the search of the widest site (awq.py): about eight float32 copies of its stacked
rows (each RTN rounding makes several) and four of the sampled outputs, fitted to the measurement below. `gptaq`
adds the float twin (one more block, one more set of block inputs) and, per group, the cross matrix beside the
Hessian while both accumulate, then the Hessian's dampened copy and its factor while the target is shifted.
Measured on one H200, Qwen2.5-7B widths, 64 x 512 (docs/BENCHMARKS.md): plain 4.11 GiB (predicted 4.74), awq 6.47
(7.52), gptaq 6.64 (6.73), both 6.69 (7.52).
"""

from __future__ import annotations

import math
from collections import defaultdict

from dscompress.compress.gptq.awq import SAMPLE_TOKENS
from dscompress.compress.gptq.solve import EXPERT_MEMORY_SHARE, KEEP_BYTES


def layer_params(targets) -> dict[int, int]:
    """Parameters of each decoder layer's weight targets (norms and routers are too small to count)."""
    per_layer: dict[int, int] = defaultdict(int)
    for t in targets:
        if t.layer >= 0:
            per_layer[t.layer] += math.prod(t.param.shape)
    return dict(per_layer)


def accelerator_peak(targets, hidden: int, samples: int, seq_len: int, batch_size: int, devices: int,
                     dtype_bytes: int, free_bytes: int | None = None, awq: bool = False,
                     gptaq: bool = False) -> dict:  # fmt: skip
    """{'dense_bytes', 'expert_budget_bytes', 'peak_bytes', ...} for quantizing `targets` (WeightTargets, meta
    tensors are fine). free_bytes: the accelerator's free memory before the pass; without it the MoE budget is
    left out of peak_bytes and reported as a share."""
    rows: dict[tuple[int, int], int] = defaultdict(int)  # (layer, in_features) -> stacked output rows
    widest_mlp, experts = 0, []  # experts: (hessians, solve work) bytes of each stacked group, unbounded
    for t in targets:
        if t.layer < 0:
            continue
        shape = t.param.shape
        if t.kind == "experts":
            n, o, i = shape
            experts.append((n * i * i * 4, n * 4 * (6 * i * i + 4 * o * i)))
            continue
        rows[(t.layer, shape[-1])] += shape[0]
        if t.name.endswith("down_proj"):
            widest_mlp = max(widest_mlp, shape[-1])
    layer = max(layer_params(targets).values(), default=0) * dtype_bytes
    tokens = math.ceil(samples / devices) * seq_len
    activations = 2 * tokens * hidden * dtype_bytes
    solve = max((2 * i * i * 4 + 3 * r * i * 4 for (_, i), r in rows.items()), default=0)
    down_in = tokens * widest_mlp * dtype_bytes
    mlp_batch = 3 * min(batch_size, samples) * seq_len * widest_mlp * dtype_bytes + (
        down_in if down_in <= KEEP_BYTES else 0
    )
    dense = layer + activations + solve + mlp_batch
    if gptaq:
        batch_tokens = min(batch_size, samples) * seq_len
        shift = max((max(3 * i * i * 4 + 3 * r * i * 4, 2 * i * i * 4 + 2 * batch_tokens * i * 4)
                     for (_, i), r in rows.items()), default=0)  # fmt: skip
        dense = layer * 2 + activations * 3 // 2 + max(solve, shift) + mlp_batch
    if awq:  # before the solve of each block, not during it
        search = max((8 * r * i * 4 + SAMPLE_TOKENS * (4 * r + i) * 4 for (_, i), r in rows.items()), default=0)
        dense = max(dense, layer + activations + search + min(batch_size, samples) * seq_len * widest_mlp * 4)
    moe = bool(experts)
    out = {"layer_bytes": layer, "activation_bytes": activations, "solve_bytes": solve, "dense_bytes": dense,
           "expert_budget_share": 2 * EXPERT_MEMORY_SHARE if moe else 0.0}  # fmt: skip
    budget = 0
    if moe and free_bytes is not None:  # each part is capped by the share, or by what all experts need
        cap = EXPERT_MEMORY_SHARE * max(0, free_bytes - layer - activations)
        budget = int(max(min(cap, h) + min(cap, w) for h, w in experts))
    out["expert_budget_bytes"] = budget
    out["peak_bytes"] = int(max(dense, layer + activations + budget) if moe else dense)
    return out
