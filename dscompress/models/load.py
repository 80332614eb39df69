"""Loading a checked checkpoint directory: its config (refusing remote code unless allowed), its model
(safetensors only) and its tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dscompress.errors import ModelSourceError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_config(directory: Path, trust_remote_code: bool = False):
    from transformers import AutoConfig

    raw = json.loads((directory / "config.json").read_text())
    if raw.get("auto_map") and not trust_remote_code:
        raise ModelSourceError(
            f"{directory}: this checkpoint ships its own modeling code (auto_map). Fix: set "
            "model.trust_remote_code: true in the recipe only if you trust its author"
        )
    try:
        return AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as exc:
        raise ModelSourceError(f"{directory}: cannot read config.json ({str(exc).splitlines()[0]})") from exc


def load_model(directory: Path, dtype: str = "float32", trust_remote_code: bool = False):
    """Load a checked checkpoint directory with transformers, safetensors only, in eval mode on CPU."""
    from transformers import AutoModelForCausalLM

    load_config(directory, trust_remote_code)  # refuses remote code before transformers would run it
    model = AutoModelForCausalLM.from_pretrained(
        directory, dtype=DTYPES[dtype], use_safetensors=True, trust_remote_code=trust_remote_code
    )
    return model.eval()


def load_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)
