"""Loading a checked checkpoint directory: its config (refusing remote code unless allowed), its model
(safetensors only) and its tokenizer."""

from __future__ import annotations

import json
import re
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
    model, info = AutoModelForCausalLM.from_pretrained(
        directory, dtype=DTYPES[dtype], use_safetensors=True, trust_remote_code=trust_remote_code,
        output_loading_info=True,
    )  # fmt: skip
    check_complete(directory, info, model)
    return model.eval()


def check_complete(directory: Path, info: dict, model=None) -> None:
    """Refuse a checkpoint that lacks a tensor the architecture needs (transformers would fill it with random
    values and every stage after would compress a model that is not the user's), has one it does not know, or
    has one of the wrong shape. Tensors the architecture itself declares ignorable are let through (DeepSeek-V3's
    multi-token-prediction layer 61, which transformers does not model)."""

    def kept(names, attr: str) -> list[str]:
        patterns = [re.compile(p) for p in getattr(model, attr, None) or ()]
        return sorted(n for n in names or () if not any(p.search(n) for p in patterns))

    problems = [
        ("is missing", kept(info.get("missing_keys"), "_keys_to_ignore_on_load_missing")),
        ("has unexpected tensors", kept(info.get("unexpected_keys"), "_keys_to_ignore_on_load_unexpected")),
        ("has tensors of the wrong shape", sorted(str(k[0] if isinstance(k, tuple) else k)
                                                  for k in info.get("mismatched_keys") or ())),
    ]  # fmt: skip
    for what, names in problems:
        if names:
            more = f" (+{len(names) - 3} more)" if len(names) > 3 else ""
            raise ModelSourceError(
                f"{directory}: the checkpoint {what} for its architecture: {', '.join(names[:3])}{more}. Fix: use "
                "a complete checkpoint whose config.json matches its weights"
            )


def load_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)
