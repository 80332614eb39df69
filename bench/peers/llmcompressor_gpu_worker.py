"""llm-compressor 0.14 on a GPU, as its docs show it: a checkpoint loaded on the CPU with `from_pretrained`, then
`oneshot(GPTQModifier(...))`, whose sequential pipeline onloads one decoder layer at a time to the GPU (MoE
experts loaded as Linear modules through `load_quantizable_moe`, every expert calibrated). W4A16: symmetric INT4,
group 128, static act-order; lm_head and MoE routers stay in float. An FP8 block-scaled checkpoint goes the way
llm-compressor's error message names: a bf16 copy written by compressed-tensors' convert_checkpoint first
(transformers 5.17's own FP8 dequantization on load cannot read DeepSeek-V3's 576-row kv_a_proj_with_mqa, whose
last 128-row block is partial, and leaves it randomly initialized).

Nothing is saved: the time is the conversion (FP8), the load and `oneshot`. Peak GPU memory from torch's
allocator, peak CPU RSS sampled from /proc every 50 ms. Usage (inside the venv bench/gptq_gpu_side_by_side.py makes):

    python llmcompressor_gpu_worker.py job.json   # {"model", "windows", "fp8", "group_size", "result"}
"""

import json
import sys
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file


class PeakRss:
    def __init__(self):
        self.peak = 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    self.peak = max(self.peak, int(line.split()[1]))
            time.sleep(0.05)


def placeholder():
    """oneshot wants a processor with any dataset; the windows are token ids already, so it tokenizes nothing."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = Tokenizer(models.WordLevel({"<unk>": 0, "<pad>": 1}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=vocab, unk_token="<unk>", pad_token="<pad>")


def dequantized_copy(source: str, target: Path) -> float:
    """llm-compressor's documented route for an FP8 checkpoint (oneshot refuses one): compressed-tensors'
    convert_checkpoint with FP8BlockDequantizer writes a bf16 copy. Seconds taken."""
    from compressed_tensors.entrypoints.convert import FP8BlockDequantizer, convert_checkpoint

    started = time.perf_counter()
    convert_checkpoint(source, target, FP8BlockDequantizer(targets=[r"re:.*\.layers\..*proj(_with_mqa)?$"]))
    return time.perf_counter() - started


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    rows = load_file(spec["windows"])["windows"]
    rss = PeakRss()
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modeling.moe.linearize import load_quantizable_moe
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM

    model_dir, convert_seconds = spec["model"], 0.0
    if spec.get("fp8"):
        model_dir = spec["bf16_copy"]
        convert_seconds = dequantized_copy(spec["model"], Path(model_dir))
    started = time.perf_counter()
    try:  # its docs' way for MoE: experts loaded as Linear modules, not unfused after loading
        with load_quantizable_moe():
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
        how = "load_quantizable_moe"
    except Exception as exc:  # recorded in the row; oneshot then linearizes after loading
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
        how = f"from_pretrained (load_quantizable_moe failed: {type(exc).__name__}: {str(exc)[:200]})"
    loaded = time.perf_counter()
    dataset = Dataset.from_dict({"input_ids": rows.tolist(), "attention_mask": [[1] * rows.shape[1]] * len(rows)})
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
               "group_size": spec["group_size"], "actorder": "static"}  # fmt: skip
    recipe = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                          ignore=["lm_head", "re:.*mlp.gate$"])  # fmt: skip
    oneshot(model=model, dataset=dataset, recipe=recipe, max_seq_length=rows.shape[1], processor=placeholder(),
            num_calibration_samples=len(rows))  # fmt: skip
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    done = time.perf_counter()
    quantized = sum(1 for m in model.modules() if getattr(m, "quantization_scheme", None) is not None)
    result = {
        "seconds": round(done - started + convert_seconds, 2), "convert_seconds": round(convert_seconds, 2),
        "load_seconds": round(loaded - started, 2),
        "quantize_seconds": round(done - loaded, 2), "quantized_modules": quantized, "load": how,
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        "peak_cpu_rss_gib": round(rss.peak / 2**20, 3),
    }  # fmt: skip
    Path(spec["result"]).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
