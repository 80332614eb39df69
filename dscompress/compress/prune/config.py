"""`prune:` stage configuration (torch-free: the recipe schema imports it)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Size(BaseModel):
    """Exactly one of `ratio` (share removed) or `size` (what remains)."""

    model_config = ConfigDict(extra="forbid")
    ratio: float | None = Field(None, ge=0, lt=1, description="share removed")
    size: int | None = Field(None, ge=1, description="what remains")

    @model_validator(mode="after")
    def _one(self):
        if (self.ratio is None) == (self.size is None):
            raise ValueError("give exactly one of ratio or size")
        return self

    def keep(self, total: int) -> int:
        return self.size if self.size is not None else total - round(total * self.ratio)


class HeadSize(Size):
    mode: Literal["query", "kv_group"] = Field("query", description="query: heads inside each KV group; kv_group")


class DepthSize(Size):
    metric: Literal["block_importance", "perplexity"] = Field(
        "block_importance", description="block_importance: 1 - cos(in, out); perplexity: loss rise, layer skipped"
    )
    windows: int = Field(8, ge=1, description="calibration windows scored per skipped layer (metric perplexity)")


class PruneConfig(BaseModel):
    """`prune:` stage. Example: `{importance: activation, mlp: {ratio: 0.25}, heads: {ratio: 0.25}}`."""

    model_config = ConfigDict(extra="forbid")
    importance: Literal["activation", "l1"] = Field("activation", description="how channels and heads are ranked")
    mlp: Size | None = Field(None, description="intermediate channels (per expert for routed experts)")
    heads: HeadSize | None = Field(None, description="query heads (mode query: the count kept in total)")
    depth: DepthSize | None = Field(None, description="decoder layers")
    hidden: Size | None = Field(None, description="embedding channels, across every norm, projection and lm_head")
    experts: Size | None = Field(None, description="routed experts per MoE layer, least routed first")
    batch_size: int = Field(8, ge=1, description="calibration windows per forward pass (activation importance)")

    @model_validator(mode="after")
    def _something(self):
        if not (self.mlp or self.heads or self.depth or self.hidden or self.experts):
            raise ValueError("prune needs at least one of mlp, heads, depth, hidden, experts")
        return self

    @property
    def needs_forward(self) -> bool:
        """Calibration forward passes: activation importance, block importance, routing counts."""
        return self.importance == "activation" or bool(self.depth) or bool(self.experts)
