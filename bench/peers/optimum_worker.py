"""optimum-onnx worker (its own venv, transformers < 4.58): export a checkpoint with KV cache through
ORTModelForCausalLM and report max |logit diff| to torch and greedy agreement. Usage: worker.py CKPT OUT"""

import json
import sys

import torch
from optimum.onnxruntime import ORTModelForCausalLM
from transformers import AutoModelForCausalLM

ckpt, out = sys.argv[1], sys.argv[2]
ids = torch.arange(100, 132)[None]
try:
    ort_model = ORTModelForCausalLM.from_pretrained(ckpt, export=True, use_cache=True)
    ort_model.save_pretrained(out)
    ref = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    with torch.no_grad():
        diff = float(
            (ort_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits - ref(ids).logits).abs().max()
        )
        a = ort_model.generate(ids, max_new_tokens=16, do_sample=False)
        b = ref.generate(ids, max_new_tokens=16, do_sample=False)
    print(json.dumps({"max_logit_diff": diff, "greedy_identical": bool(torch.equal(a, b)), "ids": ids[0].tolist()}))
except Exception as exc:  # report, do not crash the bench: a failed peer export is a result
    print(json.dumps({"error": f"{type(exc).__name__}: {str(exc)[:300]}", "ids": ids[0].tolist()}))
