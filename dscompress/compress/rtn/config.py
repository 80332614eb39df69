"""`rtn:` stage configuration (torch-free: the recipe schema imports it)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dscompress.compress.activations_config import Activations, activations_field, int8_blocks_problem
from dscompress.compress.rotation_config import rotate_field
from dscompress.compress.selection import WithExclude


class RTNConfig(WithExclude):
    """`rtn:` stage. Example: `{bits: 4, group_size: 64, symmetric: false}`."""

    bits: Literal[2, 3, 4, 8] = Field(4, description="bits per weight")
    group_size: Literal[-1, 32, 64, 128] = Field(
        128, description="weights sharing one scale along in_features; -1 = one per output channel"
    )
    symmetric: bool = Field(True, description="symmetric grid (zero point 2**(bits-1)) or asymmetric")
    rotate: bool = rotate_field()
    activations: Activations = activations_field()

    @model_validator(mode="after")
    def _int8_blocks_fit(self):
        if problem := int8_blocks_problem(self.activations, self.bits, self.group_size):
            raise ValueError(problem)
        return self
