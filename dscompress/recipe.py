"""The recipe schema (pydantic, extra keys forbidden) and its loader with file:line error messages.

```yaml
model: {path: bundled:smollm2-135m-instruct}
data: {eval: {samples: 16, seq_len: 512}}
stages:
  - rtn: {bits: 4, group_size: 64}
    gate: {perplexity: {max_increase_pct: 10}, kl: {max: 0.1}}
```
Every field is documented in docs/RECIPE.md; `dscompress schema` prints the JSON Schema.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dscompress.calibrate.spec import DataSpec
from dscompress.compress.distill.config import DistillConfig
from dscompress.compress.gptq.config import GPTQConfig
from dscompress.compress.int8.config import Int8Config
from dscompress.compress.prune.config import PruneConfig
from dscompress.compress.rtn.config import RTNConfig
from dscompress.errors import RecipeError
from dscompress.gates import Gate, OnnxParity
from dscompress.registry import PACKABLE, PASS_KEYS, spec_by_key
from dscompress.schema import Strict
from dscompress.yamlpaths import Loc, LocatedYaml, format_loc, load_located


class ModelSpec(Strict):
    path: str = Field(
        description="checkpoint directory (safetensors), a .gguf file, 'bundled:smollm2-135m-instruct', "
        "'bundled:qwen2.5-coder-0.5b-instruct' or 'tiny:<llama|qwen2|qwen3|qwen3_moe|deepseek_v3>'"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype of every stage")
    trust_remote_code: bool = Field(False, description="allow a checkpoint's own modeling code (auto_map)")
    stream: bool = Field(
        False,
        description="keep the decoder layers on disk and read one at a time (checkpoints larger than memory); "
        "gptq stages only",
    )


class OnnxSpec(Strict):
    targets: list[Literal["onnx", "onnx-ort", "ort-genai"]] = Field(
        default_factory=lambda: ["onnx"],
        description="onnx: standard operators, TensorRT Q/DQ rules; onnx-ort: MatMulNBits INT4 for ONNX Runtime; "
        "ort-genai: the onnx-ort graph as a folder ONNX Runtime GenAI opens (genai_config.json)",
    )
    fp16: bool = Field(False, description="onnx-ort and ort-genai only: float16 weights and compute")
    accuracy_level: Literal[0, 1, 2, 3, 4] | None = Field(
        None,
        description="onnx-ort and ort-genai only: MatMulNBits accuracy_level (4: int8 activations inside the INT4 "
        "kernel; the parity gate measures what it costs). Unset: 0, the measured default (docs/BENCHMARKS.md)",
    )

    @model_validator(mode="after")
    def _ort_options(self):
        if (self.fp16 or self.accuracy_level is not None) and "onnx" in self.targets:
            raise ValueError(
                "fp16 and accuracy_level apply to the ONNX Runtime targets (onnx-ort, ort-genai); the onnx target "
                "(TensorRT) keeps float32 around its Q/DQ nodes. Fix: put onnx in a stage of its own, or drop them"
            )
        return self

    parity: OnnxParity = Field(
        default_factory=OnnxParity, description="how far the ONNX Runtime metrics may drift from the torch stage's"
    )


class Stage(Strict):
    model_config = ConfigDict(  # the schema says what _exactly_one_pass enforces
        extra="forbid", json_schema_extra={"oneOf": [{"required": [key]} for key in PASS_KEYS]}
    )
    name: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9_-]*$", description="defaults to the pass key")
    rtn: RTNConfig | None = Field(None, description="round-to-nearest weight quantization (one pass per stage)")
    gptq: GPTQConfig | None = Field(None, description="GPTQ weight quantization (one pass per stage)")
    int8: Int8Config | None = Field(
        None,
        description="W8A8: static (KL or MinMax) or dynamic per-token activations, SmoothQuant, rotation and "
        "fallback (one pass per stage)",
    )
    prune: PruneConfig | None = Field(
        None, description="structured pruning: MLP channels, heads, hidden width, experts, depth (one pass per stage)"
    )
    distill: DistillConfig | None = Field(None, description="distillation from a teacher (one pass per stage)")
    gate: Gate | None = Field(
        None,
        description="accuracy thresholds this stage must meet, or the run stops (on_fail: stop) or drops it (skip)",
    )
    onnx: OnnxSpec | None = Field(None, description="export to ONNX and gate the stage on ONNX Runtime parity")
    save_formats: list[Literal["gptq", "gptq_v2", "compressed-tensors"]] = Field(
        default_factory=list,
        description="also write packed checkpoints of a quantized stage into <stage>/packed/<format>/",
    )

    @property
    def mixed_bits(self) -> bool:
        """A gptq stage with bits_budget: 4- and 8-bit weights side by side."""
        return self.gptq is not None and self.gptq.bits_budget is not None

    @model_validator(mode="after")
    def _exactly_one_pass(self):
        given = [k for k in PASS_KEYS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a stage takes exactly one pass, got {given or 'none'}; allowed: {', '.join(PASS_KEYS)}")
        if self.save_formats and given[0] not in PACKABLE:
            raise ValueError(f"save_formats needs a quantizing pass ({', '.join(PACKABLE)}), not {given[0]!r}")
        if self.mixed_bits and self.onnx and "onnx" in self.onnx.targets:
            raise ValueError(
                "onnx.targets: a bits_budget stage has group-wise 8-bit weights, which the onnx target (TensorRT, "
                "per-channel INT8) does not take; use onnx.targets: [onnx-ort] or remove bits_budget"
            )
        if self.save_formats and self.mixed_bits:
            raise ValueError(
                "save_formats: a bits_budget stage mixes 4- and 8-bit weights, and the packed formats written here "
                "carry one bit width per checkpoint; remove save_formats (the stage's safetensors loads in stock "
                "transformers, onnx-ort exports it) or remove bits_budget"
            )
        if self.int8 is not None and self.int8.activations == "dynamic" and self.onnx and "onnx" in self.onnx.targets:
            raise ValueError(
                "int8 activations: dynamic (a scale per token at run time) runs in ONNX Runtime, and the onnx target "
                "is TensorRT's static per-tensor INT8; use onnx.targets: [onnx-ort], or activations: static"
            )
        if self.int8 is not None and self.int8.fallback == "auto" and self.gate is None:
            raise ValueError(
                "int8 fallback: auto keeps the most sensitive activations in 16/32-bit until the stage gate holds, "
                "and this stage has no gate; add a gate, or set int8.fallback: none"
            )
        return self

    @property
    def int8_blocks(self) -> bool:
        """A weight-only stage with `activations: int8` (MatMulNBits' int8 path, accuracy_level 4)."""
        weight_only = self.gptq or self.rtn
        return weight_only is not None and weight_only.activations == "int8"

    @model_validator(mode="after")
    def _int8_blocks_export(self):
        if not self.int8_blocks or self.onnx is None:
            return self
        key = "gptq" if self.gptq is not None else "rtn"
        if "onnx" in self.onnx.targets:
            raise ValueError(
                f"onnx.targets: {key}.activations: int8 quantizes activations per block inside ONNX Runtime's "
                "MatMulNBits, and the onnx target (TensorRT) quantizes them per tensor; use onnx.targets: "
                f"[onnx-ort] (or ort-genai), or {key}.activations: float"
            )
        if self.onnx.accuracy_level not in (None, 4):
            raise ValueError(
                f"onnx.accuracy_level: {self.onnx.accuracy_level} with {key}.activations: int8, which is "
                "MatMulNBits at accuracy_level 4; remove accuracy_level (4 is used) or set activations: float"
            )
        return self

    @property
    def pass_key(self) -> str:
        return next(k for k in PASS_KEYS if getattr(self, k) is not None)

    @property
    def pass_config(self) -> BaseModel:
        return getattr(self, self.pass_key)

    @property
    def weight_grid(self) -> tuple[int, int, bool] | None:
        """(bits, group_size, symmetric) of the weights a quantizing pass leaves, else None."""
        if not spec_by_key(self.pass_key).quantizes:
            return None
        cfg = self.pass_config
        return cfg.bits, cfg.group_size, cfg.symmetric

    @property
    def label(self) -> str:
        return self.name or self.pass_key


class TargetSpec(Strict):
    """Where the result is deployed; checked before any compute (docs/DEPLOY.md)."""

    device: Literal["orin-agx-64gb", "orin-agx-32gb", "orin-nx-16gb", "orin-nx-8gb", "orin-nano-8gb", "x86-gpu"] = (
        Field(description="the deployment target device (Jetson Orin module or an x86 GPU)")
    )
    jetpack: Literal["6.2", "7.2"] | None = Field(None, description="required for Jetson devices")
    max_batch: int = Field(1, ge=1, le=64, description="largest batch the engine is built for")
    max_context: int = Field(2048, ge=16, description="largest past + new tokens the engine is built for")
    opt_context: int = Field(512, ge=1, description="the context TensorRT tunes its kernels for")
    opset: int = Field(21, ge=17, le=23, description="ONNX opset of the exported graph")
    workspace_mib: int = Field(2048, ge=64, description="TensorRT builder workspace limit")
    builder_optimization_level: int = Field(
        3, ge=0, le=5, description="TensorRT builder optimization level (0 fastest build, 5 most search)"
    )

    @model_validator(mode="after")
    def _jetpack_matches_device(self):
        jetson = self.device.startswith("orin")
        if jetson and self.jetpack is None:
            raise ValueError(f"{self.device} needs jetpack: engines are built per JetPack; allowed: '6.2', '7.2'")
        if not jetson and self.jetpack is not None:
            raise ValueError("jetpack applies to Jetson devices only; remove it for x86-gpu")
        if self.opt_context > self.max_context:
            raise ValueError(f"opt_context {self.opt_context} is above max_context {self.max_context}")
        return self


class Recipe(Strict):
    version: Literal[1] = Field(1, description="recipe format version")
    model: ModelSpec = Field(description="the model to compress: a path, bundled:<name> or tiny:<arch>")
    data: DataSpec = Field(
        default_factory=DataSpec, description="the text and the evaluation, calibration and training splits cut from it"
    )
    stages: list[Stage] = Field(
        min_length=1, description="the passes, in order; each reads the last stage that passed its gate"
    )
    output_dir: str = Field("out", description="relative paths resolve against the working directory")
    seed: int = Field(
        0, description="seed for data order and every random choice; the same seed repeats the run exactly"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where passes run: auto (a GPU when there is one), cpu or cuda"
    )
    target: TargetSpec | None = Field(None, description="deployment target, checked before any compute")


def _allowed_fields(loc: Loc) -> list[str]:
    """The keys a mapping at `loc` accepts, by walking the schema."""
    model: type[BaseModel] | None = Recipe
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        candidates = [a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)]
        model = candidates[0] if candidates else None
    return list(model.model_fields) if model else []


def _describe(error: dict, located: LocatedYaml) -> str:
    loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    where = located.where(loc)
    path = format_loc(loc)
    kind = error["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_fields(loc[:-1])
        if loc[-2:-1] == ("gate",):
            metrics = [a for a in allowed if a != "on_fail"]
            return (
                f"{where}: {path}: unknown gate metric {loc[-1]!r}; allowed metrics: {', '.join(metrics)} "
                "(and on_fail). Fix: gate on one of those metrics"
            )
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean {close[0]!r}?" if close else "remove it"
        return f"{where}: {path}: unknown key; allowed: {', '.join(allowed)}. Fix: {hint}"
    value = error.get("input")
    shown = "missing" if kind == "missing" else repr(value)
    if kind == "literal_error":
        return f"{where}: {path}: {shown} is not allowed; allowed: {error['ctx']['expected']}. Fix: use one of those"
    if kind == "missing":
        return f"{where}: {path}: required key is missing. Fix: add it (see docs/RECIPE.md)"
    msg = re.sub(r"^Value error, ", "", error["msg"])
    return f"{where}: {path}: {shown}: {msg}. Fix: see docs/RECIPE.md for this field"


SCHEMA_URL = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_FILE = "schema/recipe.schema.json"  # shipped in the repository; tests/test_recipe.py keeps it in sync


def recipe_schema() -> dict:
    """The recipe's JSON Schema (draft 2020-12): every key described, one pass per stage, a metric per gate."""
    return {"$schema": SCHEMA_URL, **Recipe.model_json_schema()}


def compatibility_notes(recipe: Recipe, has_experts: bool = False) -> list[str]:
    """Things a recipe may ask for that work, but not everywhere a user may expect: one line each, printed by
    `validate` and `run` and kept in report.json. `has_experts`: the model has MoE expert stacks."""
    notes = []
    for i, stage in enumerate(recipe.stages):
        if stage.mixed_bits and stage.onnx is not None and not stage.int8_blocks and stage.onnx.accuracy_level != 4:
            notes.append(
                f"stages[{i}].onnx: ONNX Runtime's CPU MatMulNBits has no fast float kernel for 8-bit weights "
                "(measured 16x slower per call than 4-bit), so this bits_budget stage decodes slower than fp32 on "
                "CPUs at accuracy_level 0; gptq.activations: int8 runs its int8 path (accuracy_level 4), the "
                "fastest graph measured, with the stage computing the same (docs/BENCHMARKS.md)"
            )
        weight_only = stage.gptq is not None or stage.rtn is not None
        if weight_only and stage.onnx is not None and stage.onnx.accuracy_level == 4 and not stage.int8_blocks:
            notes.append(
                f"stages[{i}].onnx.accuracy_level: 4 quantizes activations to int8 inside MatMulNBits, which this "
                f"stage's gate does not see (it measures float activations; the parity check measures the drift); "
                f"{stage.pass_key}.activations: int8 makes the stage compute what the graph runs"
            )
        gptq = [f for f in stage.save_formats if f in ("gptq", "gptq_v2")]
        if has_experts and gptq:
            notes.append(
                f"stages[{i}].save_formats: {gptq[0]} writes each expert as its own packed Linear, but stock "
                "transformers 5.x (with gptqmodel 7.6) keeps MoE experts fused and loads such a checkpoint with the "
                "experts left uninitialized (a load report, no error). For transformers use compressed-tensors "
                "(symmetric: true), which loads with the experts"
            )
        if "compressed-tensors" in stage.save_formats and getattr(stage.pass_config, "symmetric", True) is False:
            notes.append(
                f"stages[{i}].save_formats: an asymmetric compressed-tensors checkpoint is read by compressed-tensors' "
                "own decompressor, but stock transformers 5.x with compressed-tensors 0.20 cannot load it (their "
                "weight_zero_point sizes disagree, for their own asymmetric checkpoints too). For transformers use "
                "symmetric: true; for gptqmodel, gptq_v2"
            )
    return notes


def parse_recipe(located: LocatedYaml) -> Recipe:
    try:
        return Recipe.model_validate(located.data)
    except ValidationError as exc:
        errors = exc.errors()
        first = _describe(errors[0], located)
        more = f" (+{len(errors) - 1} more; run `dscompress validate` to list all)" if len(errors) > 1 else ""
        err = RecipeError(first + more)
        err.all_messages = [_describe(e, located) for e in errors]
        raise err from None


def load_recipe(path: Path) -> tuple[Recipe, LocatedYaml]:
    located = load_located(path)
    return parse_recipe(located), located
