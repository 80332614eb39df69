"""GPTQ speed and peak accelerator memory on random-init models of real shapes (GPU benchmark).

Weights are random (std 0.02), so only time and memory mean anything here; accuracy is measured on the real
SmolLM2 in bench/bench_gptq.py. A memory cap below the model's own size shows that the pass streams one decoder
block at a time:

    python bench/bench_gptq_gpu.py --shape qwen2.5-7b --cap-gib 10 --samples 64 --seq-len 512
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DeepseekV3Config, LlamaConfig, Qwen2Config, Qwen3MoeConfig

from dscompress.compress.gptq import solve
from dscompress.compress.gptq.apply import apply
from dscompress.compress.gptq.config import GPTQConfig
from dscompress.context import StageContext
from dscompress.models.load import load_model
from dscompress.models.sources import resolve

SHAPES = {
    "smollm2-135m": lambda: LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
    ),  # fmt: skip
    # Qwen3-30B-A3B's layer shape (128 experts, 8 routed per token), 8 of its 48 layers: 5.6 B parameters
    "qwen3-moe-30b-a3b-8l": lambda: Qwen3MoeConfig(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_hidden_layers=8,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=128,
        num_experts_per_tok=8,
        tie_word_embeddings=False,
        max_position_embeddings=32768,
    ),  # fmt: skip
    # DeepSeek-V3's widths (MLA, 256 routed + 1 shared expert of 2048, 8 per token), 1 dense + N MoE layers
    "deepseek-v3-1d1m": lambda: DeepseekV3Config(
        num_hidden_layers=2, first_k_dense_replace=1, max_position_embeddings=4096
    ),  # fmt: skip
    "deepseek-v3-1d2m": lambda: DeepseekV3Config(
        num_hidden_layers=3, first_k_dense_replace=1, max_position_embeddings=4096
    ),  # fmt: skip
    "qwen2.5-7b": lambda: Qwen2Config(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        tie_word_embeddings=False,
        max_position_embeddings=32768,
    ),  # fmt: skip
}


def random_model(shape: str, dtype: torch.dtype, fill_device: torch.device):
    """Random weights without transformers' slow per-module init: build on meta, keep on CPU, fill from
    `fill_device` (a CPU generator fills a 7B model far too slowly)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(SHAPES[shape](), dtype=dtype)
    model = model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gives tied tensors separate storage
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.empty(p.shape, dtype=dtype, device=fill_device).normal_(0.0, 0.02))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek's router bias: to_empty leaves garbage
                b.zero_()
    model.model.rotary_emb.__init__(model.config)  # recompute inv_freq buffers that to_empty left empty
    return model.eval()


def quantizable(name: str) -> bool:
    """What DeepSeek-V3's FP8 checkpoint stores in float8: the decoder layers' projections (not norms, router)."""
    return ".layers." in name and name.endswith(("proj.weight", "proj_with_mqa.weight"))


def original_layout(model) -> dict[str, torch.Tensor]:
    """The model's tensors under the names and shapes of the released checkpoints: transformers 5 fuses the
    experts (gate_up_proj (E, 2I, H), down_proj (E, H, I)); the files hold experts.<e>.{gate,up,down}_proj."""
    out = {}
    for name, t in model.state_dict().items():
        if name.endswith("experts.gate_up_proj"):
            prefix, half = name.removesuffix("gate_up_proj"), t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"], out[f"{prefix}{e}.up_proj.weight"] = t[e, :half], t[e, half:]
        elif name.endswith("experts.down_proj"):
            for e in range(t.shape[0]):
                out[f"{name.removesuffix('down_proj')}{e}.down_proj.weight"] = t[e]
        else:
            out[name] = t
    return out


def fp8_blocks(w: torch.Tensor, device: torch.device, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's layout: float8_e4m3fn weight and float32 scale_inv per 128 x 128 block (amax / 448)."""
    w = w.to(device).float()
    rows, cols = w.shape
    r, c = -(-rows // block), -(-cols // block)
    padded = torch.nn.functional.pad(w, (0, c * block - cols, 0, r * block - rows))
    scale = padded.view(r, block, c, block).abs().amax((1, 3)).clamp(min=1e-12) / 448.0
    full = scale.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return (w / full).to(torch.float8_e4m3fn).cpu(), scale.cpu()


def write_fp8_checkpoint(model, directory: Path, device: torch.device) -> None:
    """`model` written as an FP8 block-scaled checkpoint (quant_method fp8, e4m3, [128, 128]), one shard per
    decoder layer plus one for the rest, with its index: what DeepSeek-V3/R1 ship."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tied = model.config.get_text_config().tie_word_embeddings
    shards: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for name, t in original_layout(model).items():
        if tied and name == "lm_head.weight":
            continue
        layer = name.split(".layers.")[1].split(".")[0] if ".layers." in name else "rest"
        shards.setdefault(f"model-{layer}.safetensors", []).append((name, t))
    weight_map = {}
    for shard, views in shards.items():  # one shard in memory at a time (the views share the model's storage)
        part = {}
        for name, t in views:
            if quantizable(name):
                part[name], part[name + "_scale_inv"] = fp8_blocks(t, device)
            else:
                part[name] = t.clone()
        save_file(part, str(directory / shard), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, shard)
        del part
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = model.config.to_dict()
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}  # fmt: skip
    (directory / "config.json").write_text(json.dumps(config, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--cap-gib", type=float, default=0.0, help="accelerator memory cap (0: none)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test")
    ap.add_argument("--expert-memory-share", type=float, default=None,
                    help="share of free accelerator memory for expert Hessians and batched solves")  # fmt: skip
    ap.add_argument("--kernel", choices=["auto", "torch"], default="auto", help="the gptq pass's `kernel` option")
    ap.add_argument("--fp8-dir", type=Path, default=None,
                    help="write the random model there as an FP8 block-scaled checkpoint, then quantize what "
                         "dscompress reads from it (conversion to bf16 timed separately)")  # fmt: skip
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.expert_memory_share is not None:
        solve.EXPERT_MEMORY_SHARE = args.expert_memory_share
    t0 = time.perf_counter()
    model = random_model(args.shape, torch.bfloat16, device)
    build_s = time.perf_counter() - t0
    fp8 = {}
    if args.fp8_dir:
        write_fp8_checkpoint(model, args.fp8_dir, device)
        del model
        t1 = time.perf_counter()
        directory = resolve(str(args.fp8_dir)).directory  # FP8 -> bf16, shard by shard, into the cache
        t2 = time.perf_counter()
        model = load_model(directory, "bfloat16")
        fp8 = {"fp8_write_s": round(t1 - t0 - build_s, 1), "fp8_to_bf16_s": round(t2 - t1, 1),
               "load_s": round(time.perf_counter() - t2, 1),
               "fp8_bytes": sum(f.stat().st_size for f in args.fp8_dir.glob("*.safetensors")),
               "process_peak_rss_gib_before_pass": round(
                   resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}  # fmt: skip
    if cuda and args.cap_gib:
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(args.cap_gib * 2**30 / total, 0)
    n_params = sum(p.numel() for p in model.parameters())
    windows = torch.randint(0, model.config.vocab_size, (args.samples, args.seq_len), generator=torch.Generator())
    config = GPTQConfig(bits=4, group_size=args.group_size, symmetric=True, batch_size=8, kernel=args.kernel)
    with StageContext.standalone(model, windows, device) as ctx:
        t1 = time.perf_counter()
        out = apply(model, config, ctx)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t1
    result = {
        "shape": args.shape, "params": n_params, "model_bytes_bf16": n_params * 2,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu", "cap_gib": args.cap_gib,
        "samples": args.samples, "seq_len": args.seq_len, "group_size": args.group_size,
        "gptq_seconds": round(seconds, 2),
        "seconds_per_billion_params": round(seconds / (n_params / 1e9), 2),
        "peak_accelerator_gib": round(out.summary["peak_accelerator_bytes"] / 2**30, 3),
        "peak_cpu_rss_gib": round(out.summary["peak_rss_bytes"] / 2**30, 3),
        "expert_memory_share": solve.EXPERT_MEMORY_SHARE, "kernel": args.kernel,
        "model_build_seconds": round(build_s, 1), "torch": torch.__version__, **fp8,
    }  # fmt: skip
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
