"""Accuracy gates: the recipe's gate models, hard thresholds on perplexity increase, mean KL and top-1 agreement,
and the margin rule passes use while they search for a setting that will hold (int8 fallback). Torch-free."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from dscompress.schema import Strict


class PerplexityGate(Strict):
    max_increase_pct: float = Field(ge=0, description="allowed perplexity increase, in percent")
    relative_to: Literal["baseline", "previous"] = Field(
        "baseline", description="compare with the baseline or with the previous passing stage"
    )


class KLGate(Strict):
    max: float = Field(gt=0, description="allowed mean KL(baseline || stage), nats per token")


class Top1Gate(Strict):
    min: float = Field(gt=0, le=1, description="required share of positions whose top-1 token agrees")


class Gate(Strict):
    model_config = ConfigDict(  # the schema says what _has_a_check enforces
        extra="forbid",
        json_schema_extra={"anyOf": [{"required": ["perplexity"]}, {"required": ["kl"]}, {"required": ["top1"]}]},
    )
    perplexity: PerplexityGate | None = Field(None, description="maximum perplexity increase, in percent")
    kl: KLGate | None = Field(None, description="maximum mean KL to the unquantized model, nats/token")
    top1: Top1Gate | None = Field(None, description="minimum top-1 agreement with the unquantized model (0-1)")
    on_fail: Literal["stop", "skip"] = Field(
        "stop", description="stop: exit with code 3; skip: drop this stage and continue from the previous"
    )

    @model_validator(mode="after")
    def _has_a_check(self):
        if not (self.perplexity or self.kl or self.top1):
            raise ValueError("a gate needs at least one of perplexity, kl, top1")
        return self


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

    >>> from dscompress.gates import Gate
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
    return [_refuse_non_finite(v) for v in verdicts]


def _refuse_non_finite(v: Verdict) -> Verdict:
    """A NaN or infinite metric never passes (NaN compares false both ways, so say it plainly)."""
    if math.isfinite(v.value):
        return v
    return Verdict(v.metric, v.value, v.threshold, v.op, False, f"{v.detail}: not a finite number, which never passes")


def within_margin(estimate: dict, gate: Gate, margin: float) -> bool:
    """Whether an estimate meets `margin` of the gate's slack on every gated metric (never when one is NaN/Inf)."""
    if not all(math.isfinite(estimate[k]) for k in ("kl", "perplexity_increase_pct", "top1") if k in estimate):
        return False
    if gate.kl and estimate["kl"] > margin * gate.kl.max:
        return False
    if gate.perplexity and estimate["perplexity_increase_pct"] > margin * gate.perplexity.max_increase_pct:
        return False
    return not (gate.top1 and estimate["top1"] < 1.0 - margin * (1.0 - gate.top1.min))


class OnnxParity(Strict):
    """How far the exported model may drift from the torch stage, on the evaluation windows."""

    max_perplexity_diff_pct: float = Field(0.5, ge=0, description="|ppl_onnx / ppl_torch - 1|, in percent")
    max_kl_diff: float = Field(0.002, ge=0, description="|KL_onnx - KL_torch| to the baseline, nats/token")
    max_top1_diff: float = Field(0.01, ge=0, description="|top1_onnx - top1_torch|")
    greedy_prompts: int = Field(4, ge=0, description="unquantized stages: prompts whose greedy tokens must match")
    greedy_tokens: int = Field(16, ge=1, description="tokens generated per prompt for that check")


def parity_verdicts(label: str, ort: dict, torch_metrics: dict, tolerance: OnnxParity) -> list[Verdict]:
    """The exported model (in the runtime it targets) against the torch stage, on the same windows."""
    ppl_diff = abs(ort["perplexity"] / torch_metrics["perplexity"] - 1.0) * 100.0
    shown = f"{label} ({ort['session']})" if ort.get("session") else label
    kl_diff, top1_diff = abs(ort["kl"] - torch_metrics["kl"]), abs(ort["top1"] - torch_metrics["top1"])
    return [
        _at_most(
            f"onnx:{label}:perplexity", ppl_diff, tolerance.max_perplexity_diff_pct,
            f"{shown}: ORT perplexity {ort['perplexity']:.4f} vs torch {torch_metrics['perplexity']:.4f}"
            f" ({ppl_diff:.3f}%, max {tolerance.max_perplexity_diff_pct:g}%)",
        ),
        _at_most(
            f"onnx:{label}:kl", kl_diff, tolerance.max_kl_diff,
            f"{shown}: ORT KL {ort['kl']:.5f} vs torch {torch_metrics['kl']:.5f} (max diff {tolerance.max_kl_diff:g})",
        ),
        _at_most(
            f"onnx:{label}:top1", top1_diff, tolerance.max_top1_diff,
            f"{shown}: ORT top-1 {ort['top1']:.4f} vs torch {torch_metrics['top1']:.4f}"
            f" (max diff {tolerance.max_top1_diff:g})",
        ),
    ]  # fmt: skip


def greedy_verdict(label: str, greedy: dict, tolerance: OnnxParity) -> Verdict:
    """Unquantized exports: greedy tokens identical to torch's on every checked prompt."""
    same = greedy["identical_prompts"] == tolerance.greedy_prompts
    return _at_most(
        f"onnx:{label}:greedy", float(not same), 0.0,
        f"{label}: greedy tokens identical on {greedy['identical_prompts']}/{tolerance.greedy_prompts} prompts; "
        f"max |logit diff| {greedy['max_logit_diff']:.2e}",
    )  # fmt: skip


def _at_most(metric: str, value: float, limit: float, detail: str) -> Verdict:
    return Verdict(metric, value, limit, "<=", value <= limit, detail)
