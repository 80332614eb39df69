"""llmcompressor 0.14 worker: GPTQ W4A16 into a compressed-tensors checkpoint. Usage: python worker.py job.json"""

from common import Timer, finish, job
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from transformers import AutoModelForCausalLM

spec = job()
weights = {"num_bits": spec["bits"], "type": "int", "symmetric": spec["sym"], "strategy": "group",
           "group_size": spec["group_size"]}  # fmt: skip
recipe = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"])
rows = spec["calibration"]
dataset = Dataset.from_dict({"input_ids": rows.tolist(), "attention_mask": [[1] * rows.shape[1]] * len(rows)})
with Timer() as t:
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype="float32")
    oneshot(model=model, dataset=dataset, recipe=recipe, max_seq_length=rows.shape[1],
            num_calibration_samples=len(rows))  # fmt: skip
model.save_pretrained(spec["output"], save_compressed=True)
finish(spec, seconds=t.seconds)
