"""torch-pruning 1.6 worker for bench_prune.py: its LLM example's settings (GroupMagnitudeImportance p=2, per-layer
ratio, heads kept whole, lm_head ignored), the ratio searched for the target parameter count, then scored.

`scope` (from the job):
  all  its LLM example as written: attention and MLP. Under transformers 5 (and 4.57) the dependency grouping of a
       Llama attention block never closes (the group grows through the rotary embedding's expand/cat/bmm nodes;
       Torch-Pruning issue #527 reports the same on Qwen3). A watchdog stops it once one group holds more
       dependencies than GROUP_LIMIT and the worker reports that as its result.
  mlp  the same, with q/k/v/o_proj in ignored_layers: MLP channels only (the mix our own bench finds best).
"""

import torch
import torch_pruning as tp
from common import Timer, finish, job, score
from torch_pruning.dependency import group as tp_group
from transformers import AutoModelForCausalLM

spec = job()
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GROUP_LIMIT = 5_000  # far above what a 30-layer model needs (MLP groups hold a few entries)


class GroupDidNotClose(RuntimeError):
    pass


def _guarded(add_dep):
    def add(self, dep, idxs):
        if len(self._group) > GROUP_LIMIT:
            raise GroupDidNotClose(f"a dependency group grew past {GROUP_LIMIT} entries (Torch-Pruning issue #527)")
        return add_dep(self, dep, idxs)

    return add


tp_group.Group.add_dep = _guarded(tp_group.Group.add_dep)  # a watchdog only: it never changes what is pruned


def pruned(ratio: float):
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).eval()
    cfg = model.config
    num_heads, attention = {}, []
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            num_heads[m.q_proj] = cfg.num_attention_heads
            num_heads[m.k_proj] = cfg.num_key_value_heads
            num_heads[m.v_proj] = cfg.num_key_value_heads
            attention += [m.q_proj, m.k_proj, m.v_proj, m.o_proj]
    ignored = [model.lm_head] + (attention if spec.get("scope", "mlp") == "mlp" else [])
    pruner = tp.pruner.MetaPruner(
        model, example_inputs=spec["calibration"][:1, :64], importance=tp.importance.GroupMagnitudeImportance(p=2),
        global_pruning=False, output_transform=lambda x: x.logits, pruning_ratio=ratio,
        ignored_layers=ignored, num_heads=num_heads, prune_num_heads=False, prune_head_dims=False, round_to=4,
    )  # fmt: skip
    pruner.step()
    return model


def search() -> tuple[float, int]:
    """The pruning ratio whose parameter count is closest to the target (bisection, 10 steps)."""
    total = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(spec["model"]).parameters())
    goal, lo, hi, best = total * (1 - spec["target"]), 0.0, 0.95, None
    for _ in range(10):
        mid = (lo + hi) / 2
        n = sum(p.numel() for p in pruned(mid).parameters())
        if best is None or abs(n - goal) < abs(best[1] - goal):
            best = (mid, n)
        lo, hi = (mid, hi) if n > goal else (lo, mid)
    return best


try:
    with Timer() as t:
        ratio, params = search()
except GroupDidNotClose as exc:
    finish(spec, error=str(exc), seconds=t.seconds)
else:
    model = pruned(ratio).to(device)
    with torch.no_grad():
        metrics = score(lambda ids: model(ids.to(device)).logits.cpu(), spec)
    finish(spec, seconds=t.seconds, ratio=ratio, params=params, **metrics)
