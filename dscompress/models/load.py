"""Loading a checked checkpoint directory: its config (refusing remote code unless allowed), its model
(safetensors only) and its tokenizer."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from dscompress.errors import ModelSourceError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_config_json(directory: Path) -> dict:
    """config.json as a dict; a file that is not UTF-8 JSON of an object is a one-line ModelSourceError."""
    path = directory / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelSourceError(f"{path}: not valid JSON ({exc}). Fix: restore the checkpoint's config.json") from None
    if not isinstance(raw, dict):
        raise ModelSourceError(f"{path}: a JSON {type(raw).__name__}, not an object. Fix: restore config.json")
    return raw


def load_config(directory: Path, trust_remote_code: bool = False):
    from transformers import AutoConfig

    raw = read_config_json(directory)
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
    check_finite(directory, model)
    return model.eval()


def check_finite(directory: Path, model) -> None:
    """Refuse NaN or infinite weights before anything is computed from them (every metric would be NaN, and a
    NaN compares false against any gate)."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not _finite(t):
            bad = int((~torch.isfinite(t)).sum())
            raise ModelSourceError(
                f"{directory}: tensor {name} holds {bad} NaN/Inf values of {t.numel()}. Fix: use an intact "
                "checkpoint (a training divergence or a broken conversion writes these)"
            )


def _finite(t: torch.Tensor, chunk: int = 1 << 26) -> bool:
    """isfinite(t).all() in slices of `chunk` elements: on a whole tensor its temporaries (abs, two masks) take
    about twice the tensor again (a DeepSeek-V3 expert stack: 35 GiB on the GPU)."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(part).all()) for part in flat.split(chunk))


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

    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ModelSourceError(
            f"{directory}: cannot load its tokenizer ({type(exc).__name__}: {first[:200]}). Fix: restore the "
            "tokenizer files (tokenizer.json, tokenizer_config.json) from the original checkpoint"
        ) from None
