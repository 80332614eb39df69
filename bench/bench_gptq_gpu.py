"""GPTQ speed and peak accelerator memory on random-init models of real shapes (GPU benchmark).

Weights are random (std 0.02), so only time and memory mean anything here; accuracy is measured on the real
SmolLM2 in bench/bench_gptq.py. A memory cap below the model's own size shows that the pass streams one decoder
block at a time:

    python bench/bench_gptq_gpu.py --shape qwen2.5-7b --cap-gib 10 --samples 64 --seq-len 512

With --stream-dir the checkpoint is written to disk and quantized by a fresh process with model.stream (one
layer in memory at a time), whose peak RSS is reported; --fp8-dir writes it in DeepSeek's FP8 layout first (a
streamed run reads the FP8 shards as they are). bench/gptq_gpu_side_by_side.py drives this script (--write,
--load-from, --stream-from) and llm-compressor on the same checkpoint.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, DeepseekV3Config, LlamaConfig, Qwen2Config, Qwen3MoeConfig

from dscompress.compress.gptq import solve
from dscompress.compress.gptq.apply import apply
from dscompress.compress.gptq.config import GPTQConfig
from dscompress.compress.gptq.memory import accelerator_peak, layer_params
from dscompress.context import StageContext
from dscompress.models.adapters import adapter_for
from dscompress.models.load import load_model
from dscompress.models.sources import resolve
from dscompress.models.stream import load_streamed, stream_of, to_disk, write_safetensors

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


def fp8_blocks(w: torch.Tensor, device: torch.device, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's layout: float8_e4m3fn weight and float32 scale_inv per 128 x 128 block (amax / 448)."""
    w = w.to(device).float()
    rows, cols = w.shape
    r, c = -(-rows // block), -(-cols // block)
    padded = torch.nn.functional.pad(w, (0, c * block - cols, 0, r * block - rows))
    scale = padded.view(r, block, c, block).abs().amax((1, 3)).clamp(min=1e-12) / 448.0
    full = scale.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return (w / full).to(torch.float8_e4m3fn).cpu(), scale.cpu()


def write_checkpoint(model, directory: Path, device: torch.device, fp8: bool = True) -> None:
    """`model` written as a checkpoint with one shard per decoder layer plus one for the rest, with its index;
    with `fp8`, as an FP8 block-scaled checkpoint (quant_method fp8, e4m3, [128, 128]): what DeepSeek-V3/R1 ship."""
    directory.mkdir(parents=True, exist_ok=True)
    tied = model.config.get_text_config().tie_word_embeddings
    shards: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for name, t in to_disk(model.state_dict()).items():
        if tied and name == "lm_head.weight":
            continue
        layer = name.split(".layers.")[1].split(".")[0] if ".layers." in name else "rest"
        shards.setdefault(f"model-{layer}.safetensors", []).append((name, t))
    weight_map = {}
    for shard, views in shards.items():  # one shard in memory at a time (the views share the model's storage)
        part = {}
        for name, t in views:
            if fp8 and quantizable(name):
                part[name], part[name + "_scale_inv"] = fp8_blocks(t, device)
            else:
                part[name] = t
        write_safetensors(part, directory / shard)
        weight_map |= dict.fromkeys(part, shard)
        del part
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = model.config.to_dict()
    if fp8:
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [128, 128]}  # fmt: skip
    (directory / "config.json").write_text(json.dumps(config, indent=2))


class RssSampler:
    """Peak anonymous and file-backed resident memory of this process, sampled every 50 ms (ru_maxrss gives only
    their sum), so a streamed run shows whether memory held or file pages mapped made its peak."""

    def __init__(self):
        import threading

        self.max = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
        threading.Thread(target=self._run, daemon=True).start()

    def now(self) -> float:
        return round(self._read()["VmRSS"] / 2**20, 3)

    @staticmethod
    def _read() -> dict:
        with open("/proc/self/status") as f:
            return {
                k: int(v.split()[0])
                for k, v in (line.split(":", 1) for line in f)
                if k in ("RssAnon", "RssFile", "VmRSS")
            }

    def _run(self) -> None:
        while True:
            for k, v in self._read().items():
                self.max[k] = max(self.max[k], v)
            time.sleep(0.05)

    def peaks(self) -> dict:
        return {f"peak_{k.lower()}_gib": round(v / 2**20, 3) for k, v in self.max.items()}


def parse_args() -> argparse.Namespace:
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
    ap.add_argument("--gptaq", type=float, default=0.0, help="the gptq pass's `gptaq` option (GPTAQ strength)")
    ap.add_argument("--awq", action="store_true", help="the gptq pass's `awq` option (AWQ scaling first)")
    ap.add_argument("--fp8-dir", type=Path, default=None,
                    help="write the random model there as an FP8 block-scaled checkpoint, then quantize what "
                         "dscompress reads from it (conversion to bf16 timed separately)")  # fmt: skip
    ap.add_argument("--stream-dir", type=Path, default=None,
                    help="model.stream: write the checkpoint (bf16, or FP8 with --fp8-dir, read as it is) and quantize "
                         "it in a fresh process that reads one layer at a time and writes the result's shards "
                         "here: that process's peak RSS is the pass's")  # fmt: skip
    ap.add_argument(
        "--stream-from",
        type=Path,
        default=None,
        help="quantize this checkpoint folder (bf16 or FP8) with model.stream, writing to --stream-dir",
    )
    ap.add_argument("--load-from", type=Path, default=None, help="load this bf16 checkpoint folder, then quantize")
    ap.add_argument("--write", type=Path, default=None, help="only write the random model there as a checkpoint")
    ap.add_argument("--write-fp8", action="store_true", help="with --write: in DeepSeek-V3's FP8 layout")
    ap.add_argument(
        "--windows",
        type=Path,
        default=None,
        help="calibration token windows (a safetensors file with `windows`); default: random tokens",
    )
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if args.expert_memory_share is not None:
        solve.EXPERT_MEMORY_SHARE = args.expert_memory_share
    if args.write:
        t0 = time.perf_counter()
        write_checkpoint(random_model(args.shape, torch.bfloat16, device), args.write, device, fp8=args.write_fp8)
        size = sum(f.stat().st_size for f in args.write.glob("*.safetensors"))
        print(json.dumps({"write_s": round(time.perf_counter() - t0, 1), "checkpoint_bytes": size}))
        return
    if args.stream_from or args.load_from:
        sampler, t0 = RssSampler(), time.perf_counter()
        if args.stream_from:  # an FP8 checkpoint is read as it is, dequantized layer by layer
            model, extra = load_streamed(args.stream_from, "bfloat16"), {"stream": True}
        else:
            model, extra = load_model(args.load_from, "bfloat16"), {}
        extra |= {"load_s": round(time.perf_counter() - t0, 2), "rss_after_load_gib": sampler.now()}
    else:
        model, extra = prepare(args, device)
        if args.stream_dir:
            extra |= stream_child(args, extra.pop("directory"))
            print(json.dumps(extra))
            if args.out:
                args.out.write_text(json.dumps(extra, indent=2) + "\n")
            return
        extra.pop("directory", None)
    result = quantize(args, model, device) | extra
    if args.stream_from or args.load_from:  # ru_maxrss survives fork + exec (a parent's model would count)
        result |= sampler.peaks()
        result["peak_cpu_rss_gib"] = result["peak_vmrss_gib"]
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


def prepare(args, device: torch.device):
    """The random model in memory, or written to disk (FP8 and stream runs): a streamed run reads it as written
    (FP8 too), an in-memory FP8 run reads its bf16 conversion."""
    t0 = time.perf_counter()
    model = random_model(args.shape, torch.bfloat16, device)
    extra = {"model_build_seconds": round(time.perf_counter() - t0, 1)}
    if not (args.fp8_dir or args.stream_dir):
        return model, extra
    target = args.fp8_dir or args.stream_dir.with_name(args.stream_dir.name + "-input")
    t1 = time.perf_counter()
    write_checkpoint(model, target, device, fp8=args.fp8_dir is not None)
    del model
    t2 = time.perf_counter()
    if args.stream_dir:  # read as written (an FP8 one too: model.stream dequantizes layer by layer)
        return None, extra | {"checkpoint_write_s": round(t2 - t1, 1), "directory": target}
    directory = resolve(str(target)).directory  # FP8 -> bf16, shard by shard, into the cache
    t3 = time.perf_counter()
    extra |= {"checkpoint_write_s": round(t2 - t1, 1), "directory": directory, "fp8_to_bf16_s": round(t3 - t2, 1),
              "fp8_bytes": sum(f.stat().st_size for f in args.fp8_dir.glob("*.safetensors"))}  # fmt: skip
    model = load_model(directory, "bfloat16")
    extra |= {"load_s": round(time.perf_counter() - t3, 1), "process_peak_rss_gib_before_pass": round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}  # fmt: skip
    return model, extra


def stream_child(args, directory: Path) -> dict:
    """Run this script again on `directory` with --stream-from: a fresh process, so its peak RSS is the pass's."""
    import subprocess
    import sys

    cmd = [sys.executable, __file__, "--stream-from", str(directory), "--stream-dir", str(args.stream_dir),
           "--shape", args.shape, "--samples", str(args.samples), "--seq-len", str(args.seq_len),
           "--group-size", str(args.group_size), "--device", args.device, "--kernel", args.kernel]  # fmt: skip
    if args.expert_memory_share is not None:
        cmd += ["--expert-memory-share", str(args.expert_memory_share)]
    done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)  # its stderr shows progress
    return json.loads(done.stdout.strip().splitlines()[-1])


def quantize(args, model, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    if cuda and args.cap_gib:
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(args.cap_gib * 2**30 / total, 0)
    n_params = sum(p.numel() for p in model.parameters())
    if args.windows:
        windows = load_file(args.windows)["windows"]
    else:
        windows = torch.randint(0, model.config.vocab_size, (args.samples, args.seq_len), generator=torch.Generator())
    config = GPTQConfig(bits=4, group_size=args.group_size, symmetric=True, batch_size=8, kernel=args.kernel,
                        gptaq=args.gptaq, awq=args.awq)  # fmt: skip
    targets = list(adapter_for(model.config).weight_targets(model))
    free = torch.cuda.mem_get_info(device)[0] if cuda else None
    predicted = accelerator_peak([t for t in targets if t.layer >= 0], model.config.hidden_size, args.samples,
                                 args.seq_len, config.batch_size, 1, 2, free, awq=args.awq,
                                 gptaq=bool(args.gptaq))  # fmt: skip
    largest_layer = max(layer_params(targets).values()) * 2
    output_dir = args.stream_dir if args.stream_from else None
    if output_dir:
        output_dir.mkdir(parents=True, exist_ok=True)
    with StageContext.standalone(model, windows, device, output_dir=output_dir) as ctx:
        t1 = time.perf_counter()
        out = apply(model, config, ctx)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t1
    if output_dir:  # the rest and the index, as a stage folder gets them (not timed)
        stream_of(model).save(model, output_dir)
    return {
        "shape": args.shape, "params": n_params, "model_bytes_bf16": n_params * 2,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu", "cap_gib": args.cap_gib,
        "samples": windows.shape[0], "seq_len": windows.shape[1], "group_size": args.group_size,
        "gptq_seconds": round(seconds, 2),
        "seconds_per_billion_params": round(seconds / (n_params / 1e9), 2),
        "peak_accelerator_gib": round(out.summary["peak_accelerator_bytes"] / 2**30, 3),
        "predicted_peak_accelerator_gib": round(predicted["peak_bytes"] / 2**30, 3),
        "peak_cpu_rss_gib": round(out.summary["peak_rss_bytes"] / 2**30, 3),
        "largest_layer_gib": round(largest_layer / 2**30, 3),
        "layer_peak_accelerator_gib": out.summary["layer_peak_accelerator_gib"],
        "layer_seconds": out.summary["layer_seconds"],
        "expert_memory_share": solve.EXPERT_MEMORY_SHARE, "kernel": args.kernel, "torch": torch.__version__,
        "gptaq": args.gptaq, "awq": args.awq,
    }  # fmt: skip


if __name__ == "__main__":
    main()
