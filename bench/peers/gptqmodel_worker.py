"""gptqmodel 7.6 worker: quantize (GPTQ) or load-and-evaluate a GPTQ checkpoint. Usage: python worker.py job.json"""

import os

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import torch  # noqa: E402
from common import Timer, finish, job, perplexity  # noqa: E402
from gptqmodel import GPTQModel, QuantizeConfig  # noqa: E402

spec = job()
if spec["mode"] == "quantize":
    config = QuantizeConfig(bits=spec["bits"], group_size=spec["group_size"], sym=spec["sym"], desc_act=False)
    rows = [{"input_ids": r.tolist(), "attention_mask": [1] * len(r)} for r in spec["calibration"]]
    with Timer() as t:
        model = GPTQModel.load(spec["model"], config, device="cpu")
        model.quantize(rows, batch_size=1)
    model.save(spec["output"])
    finish(spec, seconds=t.seconds)
else:  # "evaluate": load a GPTQ checkpoint (ours) with gptqmodel and measure perplexity in its runtime
    model = GPTQModel.load(spec["output"], device="cpu")
    finish(spec, perplexity=perplexity(model, spec["eval"]), backend=str(getattr(model, "backend", "")))
    del torch
