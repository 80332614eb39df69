"""Which mix of pruned dimensions lost least on the real models, before retraining: `plan` prints it beside each
prune stage. Measured by bench/bench_prune.py on an H200 (SmolLM2: bench/results/prune_gpu.json; Qwen2.5-Coder:
bench/results/prune_gpu_qwen.json; docs/BENCHMARKS.md), perplexity on the held-out pydoc split of Python 3.12."""

from __future__ import annotations

# (share of parameters removed, least-loss mix, its perplexity, the runner-up)
SMOLLM2 = ("SmolLM2-135M (Llama)", 15.59, (
    (0.10, "mlp: {ratio: 0.169} with importance: activation", 18.92, "depth 1/3 + mlp: 20.26"),
    (0.25, "mlp: {ratio: 0.42} with importance: activation", 35.43, "depth 1/3 + mlp: 35.92"),
    (0.40, "depth: {ratio: 0.18} + mlp: {ratio: 0.54} with importance: activation", 109.56, "mlp alone: 148.09"),
))  # fmt: skip
QWEN = ("Qwen2.5-Coder-0.5B (Qwen2)", 10.71, (
    (0.10, "mlp: {ratio: 0.157} with importance: activation", 12.11, "hidden + mlp: 12.94"),
    (0.25, "mlp: {ratio: 0.393} with importance: activation", 18.34, "depth by perplexity impact: 30.47"),
    (0.40, "mlp: {ratio: 0.63} with importance: activation", 46.80, "depth by perplexity impact: 219.73"),
))  # fmt: skip
BY_FAMILY = {"qwen2": QWEN, "qwen3": QWEN, "qwen3_moe": QWEN}


def advice(removed: float, model_type: str = "llama") -> str:
    """The measured advice nearest to `removed` (share of parameters), from the closest measured family."""
    name, baseline, measured = BY_FAMILY.get(model_type, SMOLLM2)
    share, mix, ppl, runner_up = min(measured, key=lambda m: abs(m[0] - removed))
    return (f"{name} at {share:.0%} fewer parameters lost least with {mix} (perplexity {ppl:.2f} vs "
            f"{baseline} before retraining; {runner_up}); heads and l1 importance lost far more. "
            "Distill afterwards")  # fmt: skip
