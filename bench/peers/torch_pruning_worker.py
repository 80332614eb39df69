"""torch-pruning 1.6 worker for bench_prune.py: its LLM example's settings (GroupMagnitudeImportance p=2, per-layer
ratio, heads kept whole, lm_head ignored), the ratio searched for the target parameter count, then scored."""

import torch
import torch_pruning as tp
from common import Timer, finish, job, score
from transformers import AutoModelForCausalLM

spec = job()
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pruned(ratio: float):
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).eval()
    cfg = model.config
    num_heads = {}
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            num_heads[m.q_proj] = cfg.num_attention_heads
            num_heads[m.k_proj] = cfg.num_key_value_heads
            num_heads[m.v_proj] = cfg.num_key_value_heads
    pruner = tp.pruner.MetaPruner(
        model, example_inputs=spec["calibration"][:1, :64], importance=tp.importance.GroupMagnitudeImportance(p=2),
        global_pruning=False, output_transform=lambda x: x.logits, pruning_ratio=ratio,
        ignored_layers=[model.lm_head], num_heads=num_heads, prune_num_heads=False, prune_head_dims=False,
        round_to=4,
    )  # fmt: skip
    pruner.step()
    return model


total = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(spec["model"]).parameters())
goal, lo, hi, best = total * (1 - spec["target"]), 0.0, 0.95, None
with Timer() as t:
    for _ in range(10):
        mid = (lo + hi) / 2
        model = pruned(mid)
        n = sum(p.numel() for p in model.parameters())
        if best is None or abs(n - goal) < abs(best[1] - goal):
            best = (mid, n)
        lo, hi = (mid, hi) if n > goal else (lo, mid)
model = pruned(best[0]).to(device)
with torch.no_grad():
    metrics = score(lambda ids: model(ids.to(device)).logits.cpu(), spec)
finish(spec, seconds=t.seconds, ratio=best[0], params=best[1], **metrics)
