"""GPTQ speed and peak accelerator memory on random-init models of real shapes (GPU benchmark).

Weights are random (std 0.02), so only time and memory mean anything here; accuracy is measured on the real
SmolLM2 in bench/bench_gptq.py. A memory cap below the model's own size shows that the pass streams one decoder
block at a time:

    python bench/bench_gptq_gpu.py --shape qwen2.5-7b --cap-gib 10 --samples 64 --seq-len 512
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DeepseekV3Config, LlamaConfig, Qwen2Config, Qwen3MoeConfig

from dscompress.compress.gptq import solve
from dscompress.compress.gptq.apply import apply
from dscompress.compress.gptq.config import GPTQConfig
from dscompress.context import StageContext

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
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.expert_memory_share is not None:
        solve.EXPERT_MEMORY_SHARE = args.expert_memory_share
    t0 = time.perf_counter()
    model = random_model(args.shape, torch.bfloat16, device)
    build_s = time.perf_counter() - t0
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
        "model_build_seconds": round(build_s, 1), "torch": torch.__version__,
    }  # fmt: skip
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
