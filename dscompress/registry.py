"""The one explicit pass registry: each pass's YAML key, config, traits and the module that runs it.

Adding a pass: a `compress/<algo>/` folder with `config.py` (torch-free pydantic) and `apply.py` (defining
`apply(model, config, ctx) -> PassOutput` and `check(config, info) -> [(field, message)]`), one entry here, and
one optional field on `recipe.Stage` (tests/test_recipe.py checks that the two agree).

The registry names each pass's module instead of importing it, so that reading a recipe (`schema`, `validate`'s
first half) never imports torch; the module is imported when the pass is checked against a model or run.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module

from pydantic import BaseModel

from dscompress.compress.distill.config import DistillConfig
from dscompress.compress.gptq.config import GPTQConfig
from dscompress.compress.int8.config import Int8Config
from dscompress.compress.prune.config import PruneConfig
from dscompress.compress.rtn.config import RTNConfig


@dataclass(frozen=True)
class PassSpec:
    key: str  # the stage's YAML key
    config: type[BaseModel]
    module: str  # defines apply(model, config, StageContext) -> PassOutput and check(config, ModelInfo)
    summary: str
    needs: frozenset[str] = frozenset()  # data splits besides eval: "calibration", "train"
    quantizes: bool = False  # the config has bits / group_size / symmetric: the weights end on that grid
    packable: bool = False  # leaves weight quantization metadata that GPTQ / compressed-tensors can carry
    reshapes: bool = False  # changes the model's shapes: later stages and `plan` see a new config
    trains: bool = False  # updates weights by gradient descent (needs the train split, a teacher)

    def apply(self, model, config: BaseModel, ctx):
        return import_module(self.module).apply(model, config, ctx)

    def check(self, config: BaseModel, info) -> list[tuple[str, str]]:
        """Model-dependent problems as (field, message), before any compute."""
        return import_module(self.module).check(config, info)


_CALIBRATION = frozenset({"calibration"})

REGISTRY: dict[type[BaseModel], PassSpec] = {
    spec.config: spec
    for spec in (
        PassSpec("rtn", RTNConfig, "dscompress.compress.rtn.apply", "weight-only round-to-nearest",
                 quantizes=True, packable=True),
        PassSpec("gptq", GPTQConfig, "dscompress.compress.gptq.apply", "GPTQ weight-only, layer by layer",
                 _CALIBRATION, quantizes=True, packable=True),
        PassSpec("int8", Int8Config, "dscompress.compress.int8.apply",
                 "W8A8: int8 activations static (KL-calibrated) or dynamic per token, SmoothQuant, rotation",
                 _CALIBRATION, quantizes=True),
        PassSpec("prune", PruneConfig, "dscompress.compress.prune.apply",
                 "structured pruning: MLP channels, heads, hidden, experts, depth", _CALIBRATION, reshapes=True),
        PassSpec("distill", DistillConfig, "dscompress.compress.distill.apply",
                 "distillation from the teacher: forward KL on logits", frozenset({"train"}), trains=True),
    )
}  # fmt: skip

PASS_KEYS = tuple(spec.key for spec in REGISTRY.values())
PACKABLE = tuple(spec.key for spec in REGISTRY.values() if spec.packable)


def spec_for(config: BaseModel) -> PassSpec:
    return REGISTRY[type(config)]


def spec_by_key(key: str) -> PassSpec:
    return next(spec for spec in REGISTRY.values() if spec.key == key)
