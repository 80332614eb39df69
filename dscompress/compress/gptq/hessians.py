"""The Hessians GPTQ solves against, gathered by hooks while a decoder block runs (solve.py)."""

from __future__ import annotations

import torch

from dscompress.compress.gptq.math import HessianAccumulator
from dscompress.compress.layerwise import StopForward
from dscompress.models.adapters import WeightTarget


class GroupHessians:
    """Hooks that accumulate the Hessians of one weight group while its layer runs.

    With `stop`, the hook ends the layer's forward once the group's input is recorded (true-sequential passes
    need nothing after it), so collecting q/k/v costs a norm, not a whole layer.
    """

    def __init__(self, group: list[WeightTarget], device, stop: bool = False, hooks: bool = True, keep=None,
                 experts: range | None = None, fast: bool = False):  # fmt: skip
        self.group, self.handles, self.stop, self.keep = group, [], stop, keep
        first = group[0]
        if not hooks:  # the caller feeds self.acc itself
            self.acc = HessianAccumulator(first.in_features, device, fast)
            return
        if first.kind == "linear":
            self.acc = HessianAccumulator(first.in_features, device, fast)
            self.handles.append(first.module.register_forward_pre_hook(self._linear_hook))
        else:
            self.experts = experts if experts is not None else range(first.param.shape[0])
            self.accs = {e: HessianAccumulator(first.in_features, device, fast) for e in self.experts}
            self.handles.append(first.module.register_forward_pre_hook(self._experts_hook, with_kwargs=True))

    def _experts_hook(self, module, args, kwargs):
        values = list(args) + [kwargs[k] for k in ("hidden_states", "top_k_index", "top_k_weights") if k in kwargs]
        hidden, index = values[0], values[1]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        for e, acc in self.accs.items():
            rows = (index == e).any(-1)
            x = hidden[rows]
            if self.group[0].attr == "down_proj" and len(x):  # the expert's own intermediate activations
                gate, up = torch.nn.functional.linear(x, module.gate_up_proj[e]).chunk(2, dim=-1)
                x = module.act_fn(gate) * up
            acc.add(x)
        if self.stop:
            raise StopForward

    def _linear_hook(self, module, args):
        self.acc.add(args[0])
        if self.keep is not None:  # the caller reuses these inputs instead of recomputing them
            self.keep.append(args[0])
        if self.stop:
            raise StopForward

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
