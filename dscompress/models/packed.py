"""Reading packed checkpoints (GPTQ v1/v2, compressed-tensors pack-quantized) into a dscompress checkpoint:
float weights on their grid plus quantization metadata, so an already quantized model can enter a pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dscompress.artifact import copy_side_files
from dscompress.atomic import atomic_dir
from dscompress.errors import ModelSourceError
from dscompress.models.adapters import adapter_for
from dscompress.models.fp8 import fp8_config, import_fp8
from dscompress.models.load import load_model
from dscompress.quant.packing import CT_LEAVES, GPTQ_LEAVES, decode_compressed, decode_gptq
from dscompress.quant.primitives import dequantize_codes
from dscompress.quant.qstate import QuantState


def read_scheme(config: dict) -> dict:
    """bits, symmetric, method and label of a quantization_config we can import; a one-line refusal otherwise."""
    qc = config.get("quantization_config") or {}
    method = qc.get("quant_method")
    if method == "gptq":
        return {"method": "gptq", "bits": qc["bits"], "sym": qc.get("sym", True),
                "label": qc.get("checkpoint_format", "gptq")}  # fmt: skip
    if method == "compressed-tensors" and qc.get("format") == "pack-quantized":
        groups = list(qc.get("config_groups", {}).values())
        if len(groups) != 1:
            raise ModelSourceError("compressed-tensors checkpoint with several config groups: not supported yet")
        w = groups[0]["weights"]
        return {"method": "compressed-tensors", "bits": w["num_bits"], "sym": w["symmetric"], "label": ""}
    raise ModelSourceError(
        f"quantization_config {method!r} ({qc.get('format')}) cannot be imported; dscompress reads GPTQ "
        "(v1/v2), compressed-tensors pack-quantized and FP8 block-scaled (fp8) checkpoints"
    )


def _decode_shard(shard: Path, scheme: dict) -> tuple[dict, dict]:
    """(float tensors with dequantized `<module>.weight`, {module: (scale, zero, group_size)}) of one shard."""
    leaves = GPTQ_LEAVES if scheme["method"] == "gptq" else CT_LEAVES
    plain, modules = {}, {}
    with safe_open(str(shard), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open handles are not dicts)
            module, _, leaf = key.rpartition(".")
            if leaf in leaves:
                modules.setdefault(module, {})[leaf] = f.get_tensor(key)
            else:
                plain[key] = f.get_tensor(key)
    grids = {}
    for module, tensors in modules.items():
        if scheme["method"] == "gptq":
            codes, scale, zero, gs = decode_gptq(tensors, scheme["bits"], scheme["sym"], scheme["label"])
        else:
            codes, scale, zero, gs = decode_compressed(tensors, scheme["bits"], scheme["sym"])
        plain[f"{module}.weight"] = dequantize_codes(codes, scale, zero, gs)
        grids[module] = (scale, zero, gs)
    return plain, grids


def import_quantized(source: Path, target: Path) -> None:
    """Dequantize a GPTQ / compressed-tensors checkpoint into a dscompress checkpoint (float weights on their
    grid + quantization metadata), so it can enter a pipeline. Written atomically to `target`."""
    config = json.loads((source / "config.json").read_text())
    if qc := fp8_config(config):
        return import_fp8(source, target, qc)
    scheme = read_scheme(config)
    grids: dict = {}
    with atomic_dir(target) as tmp:
        for shard in sorted(source.glob("*.safetensors")):
            plain, shard_grids = _decode_shard(shard, scheme)
            grids.update(shard_grids)
            save_file(plain, str(tmp / shard.name), metadata={"format": "pt"})
        _copy_index_for_float(source, tmp, grids, scheme)
        del config["quantization_config"]
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        copy_side_files(source, tmp)
        model = load_model(tmp)
        _grids_to_state(model, adapter_for(model.config), grids, scheme).save(tmp)


def _copy_index_for_float(source: Path, tmp: Path, grids: dict, scheme: dict) -> None:
    index_path = source / "model.safetensors.index.json"
    if not index_path.exists():
        return
    index = json.loads(index_path.read_text())
    leaves = GPTQ_LEAVES if scheme["method"] == "gptq" else CT_LEAVES
    weight_map = {}
    for key, shard in index["weight_map"].items():
        module, _, leaf = key.rpartition(".")
        weight_map[f"{module}.weight" if leaf in leaves else key] = shard
    index["weight_map"] = weight_map
    (tmp / index_path.name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _grids_to_state(model, adapter, grids: dict, scheme: dict) -> QuantState:
    """Per-Linear grids (checkpoint names) -> QuantState in our names, stacking per-expert grids."""
    sizes = {gs for _, _, gs in grids.values()}
    if len(sizes) != 1:
        raise ModelSourceError(f"checkpoint mixes group sizes {sorted(sizes)}: not supported yet")
    gs = sizes.pop()
    in_widths = {t.in_features for t in adapter.weight_targets(model) if t.name in grids}
    state = QuantState(scheme["method"], scheme["bits"], -1 if in_widths == {gs} else gs, scheme["sym"])
    for t in adapter.weight_targets(model):
        if t.kind == "linear" and t.name in grids:
            state.add(t.name, t.kind, t.param.shape, *grids[t.name][:2])
        elif t.kind == "experts":
            parent, attr = t.name.rsplit(".", 1)
            parts = ("gate_proj", "up_proj") if attr == "gate_up_proj" else (attr,)
            names = [[f"{parent}.{e}.{p}" for p in parts] for e in range(t.param.shape[0])]
            if all(n in grids for row in names for n in row):
                scale = torch.stack([torch.cat([grids[n][0] for n in row]) for row in names])
                zero = torch.stack([torch.cat([grids[n][1] for n in row]) for row in names])
                state.add(t.name, t.kind, t.param.shape, scale, zero)
    return state
