"""Which mix of pruned dimensions lost least on the real SmolLM2, before retraining: `plan` prints it beside each
prune stage. Measured by bench/bench_prune.py on an H200 (bench/results/prune_gpu.json, docs/BENCHMARKS.md;
perplexity on the held-out pydoc split, baseline 15.59 there)."""

from __future__ import annotations

BASELINE_PPL = 15.59
MEASURED = (  # (share of parameters removed, least-loss mix, its perplexity, the runner-up)
    (0.10, "mlp: {ratio: 0.169} with importance: activation", 18.92, "depth 1/3 + mlp: 20.26"),
    (0.25, "mlp: {ratio: 0.42} with importance: activation", 35.43, "depth 1/3 + mlp: 35.92"),
    (0.40, "depth: {ratio: 0.18} + mlp: {ratio: 0.54} with importance: activation", 109.56, "mlp alone: 148.09"),
)


def advice(removed: float) -> str:
    """The measured advice nearest to `removed` (share of parameters)."""
    share, mix, ppl, runner_up = min(MEASURED, key=lambda m: abs(m[0] - removed))
    return (f"SmolLM2 at {share:.0%} fewer parameters lost least with {mix} (perplexity {ppl:.2f} vs "
            f"{BASELINE_PPL} before retraining; {runner_up}); heads, hidden and l1 importance lost far more. "
            "Distill afterwards")  # fmt: skip
