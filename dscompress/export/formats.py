"""Packed 4-bit checkpoints other tools load: GPTQ (v1 and v2 zero points) and compressed-tensors pack-quantized.

Both come from a quantized stage (its float weights plus quantization.{json,safetensors}); codes are recovered
exactly, never re-quantized. Packing is the dense little-endian bit stream both formats use (32 values fill
`bits` int32 words), done by compressed-tensors' own helpers.

GPTQ, per Linear (docs/DESIGN.md, "Packed checkpoints"):
  qweight int32 [in*bits/32, out] packed along in;  qzeros int32 [G, out*bits/32] packed along out;
  scales float16 [G, out];  g_idx int32 [in] = col // group_size (static groups: no permutation needed).
  checkpoint_format "gptq" (v1) stores zero - 1; "gptq_v2" stores the true zero.
compressed-tensors pack-quantized, per Linear:
  weight_packed int32 [out, in*bits/32]; weight_scale [out, G]; weight_shape [2];
  weight_zero_point (asymmetric only) int32 [out*bits/32, G]; codes and zeros are offset by 2**(bits-1).
Stacked experts are written per expert (experts.<e>.gate_proj / up_proj / down_proj), the layout of the
original Hugging Face checkpoints, which is also what save_pretrained writes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dscompress.artifact import copy_side_files, owned_dir
from dscompress.errors import ModelSourceError
from dscompress.models.load import load_model
from dscompress.quant.packing import compressed_tensors_tensors, gptq_tensors
from dscompress.quant.qstate import QuantState
from dscompress.version import __version__

FORMATS = ("gptq", "gptq_v2", "compressed-tensors")


def unfused(model, state: QuantState) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(module name, codes (out, in), scale (out, G), zero (out, G)) per Linear, splitting stacked experts."""
    for name, meta in state.targets.items():
        if meta["kind"] == "linear":
            weight = model.get_submodule(name).weight.detach()
            yield name, state.codes(name, weight), state.tensors[f"{name}.scale"], state.tensors[f"{name}.zero"]
            continue
        parent, attr = name.rsplit(".", 1)
        param = getattr(model.get_submodule(parent), attr).detach()
        codes = state.codes(name, param)  # (E, out, in)
        scale, zero = state.tensors[f"{name}.scale"], state.tensors[f"{name}.zero"]
        for e in range(param.shape[0]):
            if attr == "gate_up_proj":  # rows [0, I) are gate, [I, 2I) are up (chunk order in the forward)
                half = param.shape[1] // 2
                for part, rows in (("gate_proj", slice(0, half)), ("up_proj", slice(half, None))):
                    yield f"{parent}.{e}.{part}", codes[e, rows], scale[e, rows], zero[e, rows]
            else:
                yield f"{parent}.{e}.{attr}", codes[e], scale[e], zero[e]


def quantization_config(fmt: str, state: QuantState, ignore: list[str]) -> dict:
    if fmt in ("gptq", "gptq_v2"):
        return {
            "quant_method": "gptq", "bits": state.bits, "group_size": state.group_size, "desc_act": False,
            "sym": state.symmetric, "checkpoint_format": fmt, "true_sequential": True, "static_groups": True,
        }  # fmt: skip
    strategy = "channel" if state.group_size == -1 else "group"
    weights = {"num_bits": state.bits, "type": "int", "symmetric": state.symmetric, "strategy": strategy,
               "group_size": None if state.group_size == -1 else state.group_size, "dynamic": False}  # fmt: skip
    return {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "format": "pack-quantized"}},
        "ignore": ignore,
    }  # fmt: skip


def export(stage_dir: Path, out_dir: Path, fmt: str, dtype: torch.dtype = torch.float16) -> Path:
    """Write `stage_dir` (a quantized dscompress stage) as a `fmt` checkpoint in `out_dir` (atomically)."""
    state = QuantState.load(stage_dir)
    if state is None:
        raise ModelSourceError(f"{stage_dir}: not a quantized stage (no quantization.json); nothing to pack")
    model = load_model(stage_dir).to(dtype)
    packed = {name: (codes, scale, zero) for name, codes, scale, zero in unfused(model, state)}
    with owned_dir(out_dir, "export") as tmp:
        model.save_pretrained(tmp)  # float layout with the checkpoint's own tensor names, shard by shard
        for shard in sorted(tmp.glob("*.safetensors")):
            _rewrite_shard(shard, packed, state, fmt, dtype)
        _rewrite_index(tmp, packed, fmt, state)
        config = json.loads((tmp / "config.json").read_text())
        ignore = sorted({k.rsplit(".", 1)[0] for k in _linear_weight_names(model)} - set(packed))
        config["quantization_config"] = quantization_config(fmt, state, ignore)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if fmt != "compressed-tensors":  # AutoGPTQ / GPTQModel read this file, with the producer in meta
            qc = config["quantization_config"] | {"meta": {"quantizer": [f"dscompress:{__version__}"]}}
            (tmp / "quantize_config.json").write_text(json.dumps(qc, indent=2, sort_keys=True) + "\n")
        copy_side_files(stage_dir, tmp)
    return out_dir


def _linear_weight_names(model) -> list[str]:
    return [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def _packed_names(module: str, fmt: str) -> list[str]:
    if fmt == "compressed-tensors":
        return [f"{module}.{k}" for k in ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")]
    return [f"{module}.{k}" for k in ("qweight", "qzeros", "scales", "g_idx")]


def _rewrite_shard(shard: Path, packed: dict, state: QuantState, fmt: str, dtype) -> None:
    tensors = {}
    with safe_open(str(shard), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open handles are not dicts)
            module = key.removesuffix(".weight")
            if key.endswith(".weight") and module in packed:
                codes, scale, zero = packed[module]
                if fmt == "compressed-tensors":
                    new = compressed_tensors_tensors(codes, scale, zero, state.bits, state.symmetric, dtype)
                else:
                    new = gptq_tensors(codes, scale, zero, state.bits, state.group_size, fmt == "gptq_v2")
                tensors.update({f"{module}.{k}": v for k, v in new.items()})
            else:
                tensors[key] = f.get_tensor(key)
    save_file(tensors, str(shard), metadata={"format": "pt"})


def _rewrite_index(directory: Path, packed: dict, fmt: str, state: QuantState) -> None:
    index_path = directory / "model.safetensors.index.json"
    if not index_path.exists():
        return
    index = json.loads(index_path.read_text())
    weight_map = {}
    for key, shard in index["weight_map"].items():
        module = key.removesuffix(".weight")
        if key.endswith(".weight") and module in packed:
            names = _packed_names(module, fmt)
            if fmt == "compressed-tensors" and state.symmetric:
                names = names[:3]
            weight_map.update(dict.fromkeys(names, shard))
        else:
            weight_map[key] = shard
    index["weight_map"] = weight_map
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
