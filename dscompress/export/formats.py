"""Packed 4-bit checkpoints other tools load: GPTQ (v1 and v2 zero points) and compressed-tensors pack-quantized.

Both come from a quantized stage (its float weights plus quantization.{json,safetensors}); codes are recovered
exactly, never re-quantized. Packing is the dense little-endian bit stream both formats use (32 values fill
`bits` int32 words), done by compressed-tensors' own helpers.

GPTQ, per Linear (../shared/REFERENCE.md section 4):
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
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dscompress import __version__
from dscompress.atomic import atomic_dir
from dscompress.compress.quant import dequantize_codes
from dscompress.errors import ModelSourceError
from dscompress.export.qstate import QuantState

FORMATS = ("gptq", "gptq_v2", "compressed-tensors")


def pack_codes(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unsigned codes (2-D) -> int32 words, packed along `dim` (0 or 1)."""
    signed = (codes.to(torch.int32) - (1 << (bits - 1))).to(torch.int8)
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32  # only when packing

    return pack_to_int32(signed, bits, packed_dim=dim)


def unpack_codes(packed: torch.Tensor, bits: int, shape, dim: int) -> torch.Tensor:
    """int32 words -> unsigned codes of `shape` (2-D), int32."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    signed = unpack_from_int32(packed, bits, torch.Size(shape), packed_dim=dim)
    return signed.to(torch.int32) + (1 << (bits - 1))


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


def gptq_tensors(codes, scale, zero, bits: int, group_size: int, v2: bool) -> dict[str, torch.Tensor]:
    out_f, in_f = codes.shape
    stored_zero = zero if v2 else zero - 1  # v1 keeps zero - 1 (AutoGPTQ's historical off-by-one)
    stored_zero = stored_zero & ((1 << bits) - 1)  # v1's -1 wraps to all ones, as AutoGPTQ writes it
    gs = in_f if group_size == -1 else group_size
    return {
        "qweight": pack_codes(codes.t().contiguous(), bits, dim=0),
        "qzeros": pack_codes(stored_zero.t().contiguous(), bits, dim=1),  # (G, out) packed along out
        "scales": scale.t().contiguous().half(),
        "g_idx": (torch.arange(in_f) // gs).to(torch.int32),
    }


def compressed_tensors_tensors(codes, scale, zero, bits: int, symmetric: bool, dtype) -> dict[str, torch.Tensor]:
    tensors = {
        "weight_packed": pack_codes(codes, bits, dim=1),
        "weight_scale": scale.to(dtype).contiguous(),
        "weight_shape": torch.tensor(list(codes.shape)),
    }
    if not symmetric:
        tensors["weight_zero_point"] = pack_codes(zero, bits, dim=0)
    return tensors


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
    from dscompress.models.sources import load_model

    state = QuantState.load(stage_dir)
    if state is None:
        raise ModelSourceError(f"{stage_dir}: not a quantized stage (no quantization.json); nothing to pack")
    model = load_model(stage_dir).to(dtype)
    packed = {name: (codes, scale, zero) for name, codes, scale, zero in unfused(model, state)}
    with atomic_dir(out_dir) as tmp:
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


def copy_side_files(source: Path, target: Path) -> None:
    """Tokenizer, chat template and generation config: what a checkpoint needs besides weights and config."""
    for f in source.iterdir():
        if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens")) or f.suffix == ".jinja"
                            or f.name == "generation_config.json"):  # fmt: skip
            shutil.copy2(f, target / f.name)


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


# ---- reading packed checkpoints back -------------------------------------------------------------------------
def gptq_zero_convention(stored: torch.Tensor, bits: int, sym: bool, label: str) -> str:
    """'v1' or 'v2' for stored GPTQ zeros. A symmetric v1 checkpoint stores 2**(bits-1) - 1 everywhere; finding
    2**(bits-1) everywhere under a 'gptq' label means the zeros are really v2 (some tools write that)."""
    if label == "gptq_v2":
        return "v2"
    if sym and bool(torch.all(stored == (1 << (bits - 1)))):
        return "v2"
    return "v1"


def decode_gptq(tensors: dict[str, torch.Tensor], bits: int, sym: bool, label: str):
    """GPTQ tensors of one Linear -> (codes (out, in), scale (out, G) float32, zero (out, G) int32, group_size)."""
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    in_f, out_f = qweight.shape[0] * 32 // bits, qweight.shape[1]
    groups = scales.shape[0]
    codes = unpack_codes(qweight, bits, (in_f, out_f), dim=0).t()
    stored = unpack_codes(qzeros, bits, (groups, out_f), dim=1).t()
    if gptq_zero_convention(stored, bits, sym, label) == "v1":
        stored = (stored + 1) & ((1 << bits) - 1)
    group_size = in_f // groups
    g_idx = tensors.get("g_idx")
    if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(in_f) // group_size):
        raise ModelSourceError(
            "GPTQ checkpoint with a permuted g_idx (act-order without static groups) is not supported yet; "
            "re-quantize it with static groups (dscompress gptq act_order: true does that)"
        )
    return codes.to(torch.int32), scales.t().float().contiguous(), stored.contiguous(), group_size


def decode_compressed(tensors: dict[str, torch.Tensor], bits: int, sym: bool):
    shape = tuple(int(v) for v in tensors["weight_shape"])
    codes = unpack_codes(tensors["weight_packed"], bits, shape, dim=1)
    scale = tensors["weight_scale"].float()
    if sym:
        zero = torch.full(scale.shape, 1 << (bits - 1), dtype=torch.int32)
    else:
        zero = unpack_codes(tensors["weight_zero_point"], bits, scale.shape, dim=0)
    return codes, scale, zero, shape[1] // scale.shape[1]


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
        "(v1/v2) and compressed-tensors pack-quantized checkpoints"
    )


GPTQ_LEAVES = ("qweight", "qzeros", "scales", "g_idx")
CT_LEAVES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")


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
    from dscompress.models.adapters import adapter_for
    from dscompress.models.sources import load_model

    config = json.loads((source / "config.json").read_text())
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
