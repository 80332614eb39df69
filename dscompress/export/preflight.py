"""Pre-flight checks of a recipe against its deployment target, before any compute, and the decode roofline.

Run by `validate`, `plan` and `run` (through plan.model_problems). Each problem names the YAML path, the reason
and an alternative.
"""

from __future__ import annotations

from dscompress.export.onnx import OPSET_INT4
from dscompress.export.targets import DEVICES, GIB, JETPACKS, Device
from dscompress.models.info import DTYPE_BYTES

KV_BYTES = 2  # TensorRT keeps the KV cache in FP16


def kv_cache_bytes(config, adapter, tokens: int, batch: int) -> int:
    """Bytes of the KV cache for `tokens` positions: K and V per layer (MLA: the compressed latent + rope key)."""
    text = config.get_text_config()
    if adapter.attention == "mla":
        per_layer = text.kv_lora_rank + text.qk_rope_head_dim
    else:
        counts = adapter.head_counts(text)
        per_layer = 2 * counts.num_kv_heads * counts.head_dim
    return text.num_hidden_layers * per_layer * KV_BYTES * tokens * batch


def target_problems(recipe, info, plan: dict) -> list[tuple[tuple, str]]:
    target = recipe.target
    if target is None:
        return []
    device = DEVICES[target.device]
    problems: list[tuple[tuple, str]] = []
    if recipe.model.dtype == "bfloat16" and "bf16" not in device.precisions:
        problems.append(
            (
                ("model", "dtype"),
                f"bfloat16 does not run on {device.name} (FP16, INT8 and INT4 only); use dtype: float16",
            )
        )
    for i, stage in enumerate(recipe.stages):
        problems += _stage_problems(i, stage, device, target)
    if device.jetson:
        jetpack = JETPACKS[target.jetpack]
        if target.opset > jetpack.max_opset:
            problems.append(
                (
                    ("target", "opset"),
                    f"{target.opset} is above opset {jetpack.max_opset}, the newest "
                    f"TensorRT {jetpack.tensorrt} (JetPack {jetpack.version}) parses; use opset: "
                    f"{jetpack.max_opset}",
                )
            )
    if info.max_positions and target.max_context > info.max_positions:
        problems.append(
            (
                ("target", "max_context"),
                f"{target.max_context} is above the model's maximum of "
                f"{info.max_positions} positions; use at most {info.max_positions}",
            )
        )
    weights = engine_weight_bytes(recipe, info, plan)
    kv = kv_cache_bytes(info.config, info.adapter, target.max_context, target.max_batch)
    if weights + kv > device.usable_bytes:
        problems.append(
            (
                ("target", "max_context"),
                (
                    f"weights {weights / GIB:.2f} GiB + KV cache {kv / GIB:.2f} GiB at {target.max_context} tokens "
                    f"x batch {target.max_batch} exceed the {device.usable_bytes / GIB:.1f} GiB usable on "
                    f"{device.name} ({device.memory_bytes / GIB:.0f} GiB minus 2 GiB for the OS and CUDA); "
                    "lower max_context or max_batch, quantize to INT4, or choose a larger module"
                ),
            )
        )
    return problems


def engine_weight_bytes(recipe, info, plan: dict) -> int:
    """Weight bytes in the engine: the last stage's quantized weights as planned, every float weight in FP16."""
    last = plan["stages"][-1] if plan["stages"] else {}
    q_params = last.get("quantized_params", 0)
    float_params = info.n_params - q_params
    q_bytes = last.get("deployed_bytes", 0) - float_params * DTYPE_BYTES[recipe.model.dtype] if q_params else 0
    return int(q_bytes + float_params * 2)


def _stage_problems(i: int, stage, device: Device, target) -> list[tuple[tuple, str]]:
    if stage.weight_grid is None:
        return []
    found = precision_problems(*stage.weight_grid, device, target.opset)
    if stage.int8 is not None and stage.int8.activations == "dynamic":
        found.append(("activations", f"dynamic per-token INT8 runs in ONNX Runtime, not in TensorRT on {device.name} "
                      "(its INT8 is static, per tensor); use activations: static for this target"))  # fmt: skip
    key = stage.pass_key
    return [(("target", "opset") if field == "opset" else ("stages", i, key, field), msg) for field, msg in found]


def precision_problems(
    bits: int, group_size: int, symmetric: bool, device: Device, opset: int
) -> list[tuple[str, str]]:
    """(field, message) for weights of `bits` on `device`: shared by recipe checks and `dscompress bundle`."""
    precision = f"int{bits}"
    if precision not in device.precisions:
        allowed = ", ".join(sorted(p.upper() for p in device.precisions))
        return [
            (
                "bits",
                f"{precision.upper()} weights do not run on {device.name} (TensorRT there runs {allowed}); "
                "use bits: 4 or 8",
            )
        ]
    if precision != "int4":
        return []
    found = []
    if group_size not in device.int4_group_sizes:
        sizes = " or ".join(map(str, device.int4_group_sizes))
        found.append(
            (
                "group_size",
                f"INT4 group {group_size} does not run on {device.name}: TensorRT there runs "
                f"INT4 only at group {sizes}; use group_size: {sizes}, or int8",
            )
        )
    if not symmetric:
        found.append(
            (
                "symmetric",
                "asymmetric INT4 has nonzero zero points, which TensorRT's DequantizeLinear "
                "rejects; use symmetric: true",
            )
        )
    if opset < OPSET_INT4:
        found.append(
            (
                "opset",
                f"{opset}: INT4 DequantizeLinear with block_size needs opset {OPSET_INT4}; use opset: {OPSET_INT4}",
            )
        )
    return found


def roofline(recipe, info, plan: dict) -> dict | None:
    """Single-stream decode tokens/s bound by memory bandwidth: every weight byte and the KV cache read per token."""
    target = recipe.target
    if target is None:
        return None
    device = DEVICES[target.device]
    weights = engine_weight_bytes(recipe, info, plan)
    kv = kv_cache_bytes(info.config, info.adapter, target.max_context, 1)
    per_token = weights + kv
    return {
        "device": device.name,
        "bandwidth_gbs": device.bandwidth_gbs,
        "weight_bytes": int(weights),
        "kv_bytes_at_max_context": kv,
        "bytes_per_token": int(per_token),
        "decode_tokens_per_s": device.bandwidth_gbs * 1e9 / per_token,
        "assumptions": "batch 1; every weight byte and the whole KV cache at max_context are read once per token "
        "at the module's peak DRAM bandwidth; compute, kernel launches and the CPU are free: a ceiling, "
        "typically 60-80% is reached",
    }
