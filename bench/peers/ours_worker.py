"""dscompress worker: the gptq pass on the same windows, timed the same way as the peers."""

import shutil
from pathlib import Path

import torch
from common import Timer, finish, job

from dscompress.compress.gptq.apply import apply
from dscompress.compress.gptq.config import GPTQConfig
from dscompress.context import StageContext
from dscompress.export.formats import export
from dscompress.models.load import load_model

spec = job()
config = GPTQConfig(bits=spec["bits"], group_size=spec["group_size"], symmetric=spec["sym"])  # act_order: static
with Timer() as t:
    model = load_model(Path(spec["model"]))
    with StageContext.standalone(model, spec["calibration"]) as ctx:
        result = apply(model, config, ctx)
out = Path(spec["output"])
model.save_pretrained(out / "stage")
result.quant.save(out / "stage")
for f in Path(spec["model"]).glob("tokenizer*"):
    shutil.copy2(f, out / "stage" / f.name)
# for the gptqmodel load check: v2 zeros, since gptqmodel loads asymmetric v1 only from its own files
export(out / "stage", out / "gptq", "gptq_v2", torch.float16)
finish(spec, seconds=t.seconds)
