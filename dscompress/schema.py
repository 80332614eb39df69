"""The base of every recipe model: unknown keys are errors (a typo must not be silently ignored)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")
