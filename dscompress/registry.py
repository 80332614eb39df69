"""The one explicit pass registry, keyed by config type. Adding a pass: its config, its module, one line here,
and one optional field on `recipe.Stage` (a test checks the two agree)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel

from dscompress.compress import distill, gptq, int8, prune, rtn


@dataclass(frozen=True)
class PassSpec:
    key: str  # the stage's YAML key
    config: type[BaseModel]
    apply: Callable  # (model, config, StageContext) -> PassOutput
    check: Callable  # (config, ModelInfo) -> list[(field, message)], before any compute
    summary: str
    needs: frozenset[str] = frozenset()  # data splits besides eval: "calibration", "train"


REGISTRY: dict[type[BaseModel], PassSpec] = {
    rtn.RTNConfig: PassSpec("rtn", rtn.RTNConfig, rtn.apply, rtn.check, "weight-only round-to-nearest"),
    gptq.GPTQConfig: PassSpec(
        "gptq", gptq.GPTQConfig, gptq.apply, gptq.check, "GPTQ weight-only, layer by layer", frozenset({"calibration"})
    ),
    int8.Int8Config: PassSpec(
        "int8",
        int8.Int8Config,
        int8.apply,
        int8.check,
        "W8A8: KL-calibrated static int8 activations, SmoothQuant",
        frozenset({"calibration"}),
    ),
    prune.PruneConfig: PassSpec(
        "prune",
        prune.PruneConfig,
        prune.apply,
        prune.check,
        "structured pruning: MLP channels, heads, hidden, experts, depth",
        frozenset({"calibration"}),
    ),
    distill.DistillConfig: PassSpec(
        "distill",
        distill.DistillConfig,
        distill.apply,
        distill.check,
        "distillation from the teacher: forward KL on logits",
        frozenset({"train"}),
    ),
}


def spec_for(config: BaseModel) -> PassSpec:
    return REGISTRY[type(config)]
