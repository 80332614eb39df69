"""Layer-by-layer calibration shared by passes (gptq, int8): capture what decoder layer 0 receives, then run one
layer at a time over those inputs; a hook may stop a layer's forward once it has what it needs."""

from __future__ import annotations

import contextlib

import torch


class StopForward(Exception):
    """Raised by the capture hook once layer 0's inputs are recorded."""


def capture_layer_inputs(model, adapter, windows: torch.Tensor, batch_size: int, device) -> list[tuple]:
    """[(hidden_states, kwargs)] that decoder layer 0 receives, one entry per calibration batch, on `device`."""
    layers = adapter.layers(model)
    captured: list[tuple] = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, kwargs))
        raise StopForward

    backbone = model.get_submodule(adapter.layers_path.rsplit(".", 1)[0])
    others = [m for m in backbone.children() if m is not layers]
    for m in others:
        m.to(device)
    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, len(windows), batch_size):
            with contextlib.suppress(StopForward):
                backbone(windows[start : start + batch_size].to(device), use_cache=False)
    finally:
        handle.remove()
        for m in others:
            m.to("cpu")
    return captured


def run_layer(layer, batches: list[tuple]) -> list[torch.Tensor]:
    outs = []
    for hidden, kwargs in batches:
        try:
            out = layer(hidden, **kwargs)
        except StopForward:  # a Hessian hook has what it needs; the rest of the layer is not computed
            continue
        outs.append(out[0] if isinstance(out, tuple) else out)
    return outs
