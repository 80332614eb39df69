"""Accuracy gates: hard thresholds on perplexity increase, mean KL and top-1 agreement."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from dscompress.recipe import Gate


@dataclass(frozen=True)
class Verdict:
    metric: str  # "perplexity", "kl" or "top1"
    value: float  # the measured quantity the threshold applies to
    threshold: float
    op: str  # "<=" or ">="
    passed: bool
    detail: str  # one human sentence

    def as_dict(self) -> dict:
        return asdict(self)


def check_gate(gate: Gate, metrics: dict, baseline: dict, previous: dict) -> list[Verdict]:
    """Every configured check of `gate` on a stage's metrics.

    >>> from dscompress.recipe import Gate
    >>> [v.passed for v in check_gate(Gate(kl={"max": 0.1}), {"kl": 0.05}, {}, {})]
    [True]
    """
    verdicts = []
    if gate.perplexity:
        ref = baseline if gate.perplexity.relative_to == "baseline" else previous
        increase = (metrics["perplexity"] / ref["perplexity"] - 1.0) * 100.0
        limit = gate.perplexity.max_increase_pct
        verdicts.append(Verdict(
            "perplexity", increase, limit, "<=", increase <= limit,
            f"perplexity {metrics['perplexity']:.3f} vs {gate.perplexity.relative_to} "
            f"{ref['perplexity']:.3f}: {increase:+.2f}% (max +{limit:g}%)",
        ))  # fmt: skip
    if gate.kl:
        verdicts.append(Verdict(
            "kl", metrics["kl"], gate.kl.max, "<=", metrics["kl"] <= gate.kl.max,
            f"mean KL {metrics['kl']:.5f} nats/token (max {gate.kl.max:g})",
        ))  # fmt: skip
    if gate.top1:
        verdicts.append(Verdict(
            "top1", metrics["top1"], gate.top1.min, ">=", metrics["top1"] >= gate.top1.min,
            f"top-1 agreement {metrics['top1']:.4f} (min {gate.top1.min:g})",
        ))  # fmt: skip
    return verdicts
