"""modelopt worker for bench_w8a8.py: INT8_SMOOTHQUANT_CFG (W8A8, per-tensor static activations) fake quant."""

import modelopt.torch.quantization as mtq
import torch
from common import Timer, finish, job, score
from transformers import AutoModelForCausalLM

spec = job()
model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).eval()


def forward_loop(m):
    with torch.no_grad():
        for start in range(0, len(spec["calibration"]), 8):
            m(spec["calibration"][start : start + 8])


with Timer() as t:
    model = mtq.quantize(model, mtq.INT8_SMOOTHQUANT_CFG, forward_loop)
finish(spec, seconds=t.seconds, **score(lambda ids: model(ids).logits, spec))
