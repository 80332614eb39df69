"""Which weights a quantizing pass touches: the shared `exclude` field (regexes on module paths), the default
exclusions, and the pre-flight rule that a group size divides every selected width. Torch-free."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    from dscompress.models.adapters import WeightTarget


DEFAULT_EXCLUDE = [r"(^|\.)lm_head$", r"embed_tokens"]


class WithExclude(BaseModel):
    """The `exclude` field every quantizing pass shares: regexes (re.search) on module paths left in float."""

    model_config = ConfigDict(extra="forbid")

    exclude: list[str] = Field(
        default_factory=lambda: list(DEFAULT_EXCLUDE),
        description="regexes (re.search) on module paths left in float; default: embeddings and lm_head",
    )

    @field_validator("exclude")
    @classmethod
    def _regexes_compile(cls, value: list[str]) -> list[str]:
        return check_regexes(value)


def check_regexes(value: list[str]) -> list[str]:
    """Every pattern compiles; otherwise a ValueError (a one-line recipe error) naming it."""
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"invalid regex {pattern!r}: {exc}") from exc
    return value


def selected(targets: list[WeightTarget], exclude: list[str]) -> list[WeightTarget]:
    patterns = [re.compile(p) for p in exclude]
    return [t for t in targets if not any(p.search(t.name) for p in patterns)]


def check_group_size(config, info) -> list[tuple[str, str]]:
    """Model-dependent problems as (field, message); used by `validate` before any compute."""
    targets = info.targets
    if config.group_size == -1:
        return []
    widths = sorted({t.in_features for t in selected(targets, config.exclude)})
    bad = [w for w in widths if w % config.group_size]
    if not bad:
        return []
    fits = [g for g in (32, 64, 128) if all(w % g == 0 for w in widths)] + [-1]
    first = next(t for t in targets if t.in_features == bad[0])
    return [(
        "group_size",
        f"{config.group_size} does not divide in_features {bad[0]} of {first.name}; "
        f"use one of {', '.join(map(str, fits))}",
    )]  # fmt: skip
