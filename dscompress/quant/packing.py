"""Packed 4-bit codes both ways, as GPTQ (v1 and v2 zero points) and compressed-tensors pack-quantized store them.

Packing is the dense little-endian bit stream both formats use (32 values fill `bits` int32 words), done by
compressed-tensors' own helpers. Layouts (docs/DESIGN.md, "Packed checkpoints"):
  GPTQ, per Linear: qweight int32 [in*bits/32, out] packed along in; qzeros int32 [G, out*bits/32] packed along
  out; scales float16 [G, out]; g_idx int32 [in] = col // group_size (static groups: no permutation needed).
  checkpoint_format "gptq" (v1) stores zero - 1; "gptq_v2" stores the true zero.
  compressed-tensors pack-quantized, per Linear: weight_packed int32 [out, in*bits/32]; weight_scale [out, G];
  weight_shape [2]; weight_zero_point (asymmetric only) int32 [out*bits/32, G]; codes and zeros are offset by
  2**(bits-1).
"""

from __future__ import annotations

import torch

from dscompress.errors import ModelSourceError


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


GPTQ_LEAVES = ("qweight", "qzeros", "scales", "g_idx")


CT_LEAVES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
