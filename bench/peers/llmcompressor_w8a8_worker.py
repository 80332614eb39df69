"""llmcompressor worker for bench_w8a8.py: SmoothQuant 0.5 + W8A8 (int8 per-channel weights, dynamic per-token
int8 activations), evaluated in memory with its fake quantization."""

from common import Timer, finish, job, score
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from llmcompressor.modifiers.smoothquant import SmoothQuantModifier
from transformers import AutoModelForCausalLM

spec = job()
rows = spec["calibration"]
dataset = Dataset.from_dict({"input_ids": rows.tolist(), "attention_mask": [[1] * rows.shape[1]] * len(rows)})
recipe = [SmoothQuantModifier(smoothing_strength=0.5), QuantizationModifier(targets="Linear", scheme="W8A8",
                                                                              ignore=["lm_head"])]  # fmt: skip
with Timer() as t:
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype="float32")
    oneshot(
        model=model, dataset=dataset, recipe=recipe, max_seq_length=rows.shape[1], num_calibration_samples=len(rows)
    )
model.eval()
finish(spec, seconds=t.seconds, **score(lambda ids: model(ids).logits, spec))
