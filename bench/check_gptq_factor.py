"""Equivalence check of GPTQ's inverse-Hessian factor on a real bundled model (CPU): the factor from one Cholesky of
the reversed Hessian and an in-place triangular inverse (math.inverse_hessian_factor) against the former
cholesky_inverse + second Cholesky, each W4 asymmetric on the same 32 x 256 pydoc windows, set beside the noise
floor (the same code with batch_size 4 instead of 8). Prints JSON; KL is on 16 x 256 held-out windows.

    python bench/check_gptq_factor.py > bench/results/gptq_factor_smollm2.json            # SmolLM2, group 64
    python bench/check_gptq_factor.py qwen2.5-coder-0.5b-instruct 128 > bench/results/gptq_factor_qwen.json
"""

import json
import sys
import time

import torch

from dscompress.calibrate.data import Corpus
from dscompress.calibrate.spec import DataSpec, SplitSpec
from dscompress.compress.gptq import math as gm
from dscompress.compress.gptq.apply import apply
from dscompress.compress.gptq.config import GPTQConfig
from dscompress.context import StageContext
from dscompress.models.load import load_model, load_tokenizer
from dscompress.models.sources import resolve

torch.set_num_threads(2)
MODEL = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m-instruct"
GROUP = int(sys.argv[2]) if len(sys.argv) > 2 else 64
d = resolve(f"bundled:{MODEL}").directory
spec = DataSpec(eval=SplitSpec(samples=16, seq_len=256), calibration=SplitSpec(samples=32, seq_len=256))
corpus = Corpus(spec, load_tokenizer(d))
cal, ev = corpus.windows("calibration"), corpus.windows("eval")
new_factor = gm.inverse_hessian_factor


def old_factor(H, damp_frac, retries=6, flipped=False):
    """The factor as computed before 2026-12-01 (three to four in x in matrices alive)."""
    if flipped:
        H = H.flip((0, 1))
    mean_diag = float(torch.mean(torch.diagonal(H)))
    damp = damp_frac
    for _ in range(retries):
        work = H.clone()
        work.diagonal().add_(damp * mean_diag)
        L, info = torch.linalg.cholesky_ex(work)
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0:
                return U, damp
        damp = damp * 10.0 if damp > 0 else 1e-3
    return None


def run(factor, batch):
    gm.inverse_hessian_factor = factor
    m = load_model(d)
    with StageContext.standalone(m, cal, quiet=True) as ctx:
        t = time.time()
        out = apply(m, GPTQConfig(bits=4, group_size=GROUP, symmetric=False, batch_size=batch), ctx)
    print("run", factor.__name__, batch, round(time.time() - t, 1), file=sys.stderr)
    return out.model


def logp(m):
    with torch.no_grad():
        return torch.cat([torch.log_softmax(m(ev[i : i + 4]).logits.float(), -1) for i in range(0, len(ev), 4)])


base = logp(load_model(d))
models = {"new": run(new_factor, 8), "old": run(old_factor, 8), "new_b4": run(new_factor, 4)}
lp = {k: logp(m) for k, m in models.items()}


def kl(a, b):
    return float((a.exp() * (a - b)).sum(-1).mean())


def same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    n = sum(sa[k].numel() for k in sa if "layers" in k)
    return sum(int((sa[k] == sb[k]).sum()) for k in sa if "layers" in k) / n


res = {
    "model": MODEL,
    "group_size": GROUP,
    "kl_new_vs_old": kl(lp["old"], lp["new"]),
    "equal_weights_new_vs_old": same(models["new"], models["old"]),
    "kl_noise_floor_batch4_vs_8": kl(lp["new"], lp["new_b4"]),
    "equal_weights_noise_floor": same(models["new"], models["new_b4"]),
    "kl_to_fp32": {k: kl(base, v) for k, v in lp.items()},
}
print(json.dumps(res, indent=1))
