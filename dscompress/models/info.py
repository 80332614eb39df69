"""What a model is, known without loading its weights: built on the meta device from its config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dscompress.models.adapters import ArchAdapter, WeightTarget, adapter_for
from dscompress.models.load import load_config

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class ModelInfo:
    config: object
    adapter: ArchAdapter
    targets: list[WeightTarget]  # on meta tensors: shapes only
    n_params: int
    vocab_size: int
    max_positions: int | None
    directory: Path | None = None  # the checkpoint, where the model came from one

    def bytes(self, dtype: str) -> int:
        return self.n_params * DTYPE_BYTES[dtype]

    @property
    def has_experts(self) -> bool:
        """Whether the model has MoE expert stacks."""
        return any(t.kind == "experts" for t in self.targets)


def inspect_model(directory: Path, trust_remote_code: bool = False) -> ModelInfo:
    info = inspect_config(load_config(directory, trust_remote_code), trust_remote_code)
    info.directory = directory
    return info


def read_tensors(directory: Path, names: set[str]) -> dict[str, torch.Tensor]:
    """The named tensors found in a checkpoint's safetensors shards (absent names are left out)."""
    from safetensors import safe_open

    found = {}
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            found |= {name: f.get_tensor(name) for name in names & set(f.keys())}
    return found


def inspect_config(config, trust_remote_code: bool = False) -> ModelInfo:
    """ModelInfo of the model `config` describes (a pruned config, for `plan`)."""
    from transformers import AutoModelForCausalLM

    adapter = adapter_for(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    n_params = sum(p.numel() for p in model.parameters())  # parameters() counts tied tensors once
    return ModelInfo(
        config=config,
        adapter=adapter,
        targets=list(adapter.weight_targets(model)),
        n_params=n_params,
        vocab_size=model.config.vocab_size,
        max_positions=getattr(config, "max_position_embeddings", None),
    )
