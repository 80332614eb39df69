"""NNCF INT4 weight compression of a Hugging Face model through its PyTorch backend, as its LLM docs show it:
`nncf.compress_weights(model, mode=INT4_ASYM or INT4_SYM, group_size, ratio=1.0, awq=True,
scale_estimation=True, dataset)` on the bench's calibration windows, then every evaluation split scored against
the fp32 baseline inside this process. NNCF keeps the embedding and lm_head in its INT8 backup mode (its default);
dscompress keeps them in float. Usage (in the venv bench/bench_int4.py makes): python nncf_int4_worker.py job.json
"""

import nncf
import torch
from common import Timer, finish, job, score
from transformers import AutoModelForCausalLM

spec = job()
model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).eval()
rows = spec["calibration"]
dataset = nncf.Dataset([{"input_ids": rows[i : i + 1]} for i in range(len(rows))])
mode = nncf.CompressWeightsMode.INT4_SYM if spec["sym"] else nncf.CompressWeightsMode.INT4_ASYM
with Timer() as t, torch.no_grad():
    model = nncf.compress_weights(model, mode=mode, group_size=spec["group_size"], ratio=1.0, awq=True,
                                  scale_estimation=True, dataset=dataset, subset_size=len(rows))  # fmt: skip
metrics = {}
with torch.no_grad():
    for split, baseline in spec["baselines"].items():
        metrics[split] = score(lambda ids: model(ids).logits, {"eval": spec[f"eval_{split}"], "baseline": baseline})
finish(spec, seconds=t.seconds, splits=metrics)
