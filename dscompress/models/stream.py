"""`model: {stream: true}`: a checkpoint that is never whole in memory.

The decoder layers stay on PyTorch's meta device (shapes, no storage). A layer is read from the safetensors
shards when it runs (a forward pre-hook puts it on the device of its input; the forward hook drops it again), so
a forward pass, an evaluation or a layer-by-layer pass holds one layer at a time. Everything outside the layers
(embeddings, final norm, lm_head) is loaded as usual.

A pass that rewrites the layers one by one (gptq) hands each finished layer to `Stream.write_layer`, which writes
it to its own shard of the output folder and points the layer at it; `Stream.save` writes the rest and the shard
index. A layer of at most ASYNC_WRITE_MAX_BYTES is copied to pinned host memory and written by a background thread
while the next layer computes (one write in flight; `flush` waits for it and re-raises its error): on 2 H200s
writing the 7B shape's 28 layers synchronously took 19.4 s of a 35.7 s pass. Larger layers (a DeepSeek-V3 MoE
layer is 11 GB) are written tensor by tensor from the device (`write_safetensors`), so only one tensor at a time
is copied to CPU memory and host memory stays flat.

An FP8 block-scaled checkpoint (DeepSeek-V3/R1, Qwen3-FP8) is read as it is: each FP8 weight is dequantized to
bf16 as its layer is read (`FP8Layout`), and the layers written are bf16.

Checkpoints keep transformers' file layout: a routed expert's projections are separate tensors on disk
(`mlp.experts.E.gate_proj.weight`, ...) and stacked in memory (`mlp.experts.gate_up_proj` [E, 2I, H],
`mlp.experts.down_proj` [E, H, I]); `read_layer` stacks them as it reads and `to_disk` splits them again.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open

from dscompress.errors import ModelSourceError
from dscompress.models.fp8 import FP8Layout, fp8_config
from dscompress.models.load import DTYPES, check_complete, check_finite, load_config, read_config_json

INDEX = "model.safetensors.index.json"
_EXPERT = re.compile(r"^(?P<p>.*experts)\.(?P<e>\d+)\.(?P<w>gate_proj|up_proj|down_proj)\.weight$")
_SAFETENSORS_DTYPES = {
    torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int32: "I32", torch.int64: "I64",
    torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
}  # fmt: skip


class Shards:
    """Which shard holds each tensor of a checkpoint folder (its index, or its single model.safetensors)."""

    def __init__(self, directory: Path):
        self.directory, self.fp8 = directory, None
        if (directory / INDEX).exists():
            weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
            self.files = {name: directory / file for name, file in weight_map.items()}
        else:
            path = directory / "model.safetensors"
            with safe_open(str(path), "pt") as f:
                self.files = dict.fromkeys(f.keys(), path)
        if qc := fp8_config(read_config_json(directory)):  # FP8 weights read as bf16; scales are not tensors
            self.fp8 = FP8Layout(directory, self.files, qc)
            self.files = {n: p for n, p in self.files.items() if not self.fp8.is_scale(n)}

    @classmethod
    def of(cls, directory: Path, files: dict[str, Path]) -> Shards:
        shards = cls.__new__(cls)
        shards.directory, shards.files, shards.fp8 = directory, files, None
        return shards

    def get(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """One tensor in CPU memory; an FP8 weight is dequantized to bf16 on `device` (its float32 temporaries
        are there too). The file is opened per tensor: its mapping, whose touched pages count as resident
        memory while it is open, never spans more than this tensor."""
        with safe_open(str(self.files[name]), "pt") as f:
            t = f.get_tensor(name)
        return t if self.fp8 is None else self.fp8.dequantize(name, t, device)

    def shape(self, name: str) -> tuple[int, ...]:
        with safe_open(str(self.files[name]), "pt") as f:
            return tuple(f.get_slice(name).get_shape())

    def read(self, names: list[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        return {n: self.get(n).to(device) for n in names}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        out = {}
        for path in sorted(set(self.files.values())):
            with safe_open(str(path), "pt") as f:
                out |= {n: tuple(f.get_slice(n).get_shape()) for n in f.keys() if self.files.get(n) == path}  # noqa: SIM118
        return out

    def under(self, prefix: str) -> list[str]:
        return sorted(n for n in self.files if n.startswith(prefix))


def to_disk(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Module names -> disk names (views, no copies): the inverse of `read_layer`'s stacking."""
    out = {}
    for name, t in tensors.items():
        if name.endswith("experts.gate_up_proj"):
            prefix = name.rsplit(".", 1)[0]
            for e, (gate, up) in enumerate(w.chunk(2) for w in t):
                out[f"{prefix}.{e}.gate_proj.weight"], out[f"{prefix}.{e}.up_proj.weight"] = gate, up
        elif name.endswith("experts.down_proj"):
            prefix = name.rsplit(".", 1)[0]
            out |= {f"{prefix}.{e}.down_proj.weight": w for e, w in enumerate(t)}
        else:
            out[name] = t
    return out


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """A safetensors file written tensor by tensor (each copied to CPU on its own), then renamed into place."""
    header, offset = {"__metadata__": metadata or {"format": "pt"}}, 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for t in tensors.values():
            if t.numel():
                f.write(t.detach().contiguous().reshape(-1).cpu().view(torch.uint8).numpy())
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    tmp.replace(path)


ASYNC_WRITE_MAX_BYTES = 2 << 30  # layers up to this size are written in the background (module docstring)


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A CUDA tensor copied into pinned host memory (asynchronously: synchronize before use); CPU ones as they are."""
    if not t.is_cuda:
        return t.detach()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)


class Stream:
    """The streamed layers of one model: where each layer's tensors are, and the output shards being written."""

    def __init__(self, model, adapter, shards: Shards, dtype: torch.dtype):
        self.adapter, self.dtype = adapter, dtype
        self.layers = adapter.layers(model)
        self.n = len(self.layers)
        self.sources = [shards] * self.n
        self.written: dict[str, str] = {}  # output tensor name -> shard file name
        self._writer: ThreadPoolExecutor | None = None
        self._pending: tuple[Future, int, list[str], Path] | None = None  # the write in flight
        for index, layer in enumerate(self.layers):
            layer.register_forward_pre_hook(self._onload_hook, with_kwargs=True)
            layer.register_forward_hook(self._release_hook)
            layer._dscompress_index = index

    def prefix(self, index: int) -> str:
        return f"{self.adapter.layers_path}.{index}."

    def onload(self, index: int, device) -> torch.nn.Module:
        """Layer `index` with its tensors read onto `device`, kept there until `release` or `write_layer`."""
        if self._pending is not None and self._pending[1] == index:
            self.flush()  # read it back from the shard being written
        layer, prefix, source = self.layers[index], self.prefix(index), self.sources[index]
        layer._dscompress_onloaded = False  # the caller holds it: no forward hook releases it
        layer.load_state_dict(read_layer(source, prefix, device, self.dtype), strict=True, assign=True)
        return layer

    def adopt(self, directory: Path) -> None:
        """Read every layer from the shards another process's `write_layer` left in `directory` (the stage)."""
        self.sources = layer_shards(directory, self.n)
        self.written = {name: path.name for s in self.sources for name, path in s.files.items()}

    def release(self, index: int) -> None:
        """Back to the meta device: the layer's tensors are freed."""
        layer = self.layers[index]
        for module in layer.modules():
            for name, p in list(module._parameters.items()):
                if p is not None:
                    module._parameters[name] = torch.nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
            for name, b in list(module._buffers.items()):
                if b is not None and name not in module._non_persistent_buffers_set:
                    module._buffers[name] = torch.empty_like(b, device="meta")

    def write_layer(self, index: int, out: Path) -> None:
        """Write finished layer `index` to its own shard of `out`, read it from there from now on, release it;
        in the background for layers up to ASYNC_WRITE_MAX_BYTES (call `flush` before the shards are used)."""
        self.flush()
        path = out / shard_name(index + 2, self.n + 1)
        tensors = to_disk({self.prefix(index) + k: v for k, v in self.layers[index].state_dict().items()})
        if sum(t.numel() * t.element_size() for t in tensors.values()) > ASYNC_WRITE_MAX_BYTES:
            write_safetensors(tensors, path)
            self._record(index, list(tensors), path)
            return
        host = {name: _to_host(t) for name, t in tensors.items()}
        if any(t.is_cuda for t in tensors.values()):
            torch.cuda.current_stream().synchronize()  # the copies have landed; the device memory can go
        self.release(index)
        self._writer = self._writer or ThreadPoolExecutor(max_workers=1, thread_name_prefix="dscompress-shards")
        self._pending = (self._writer.submit(write_safetensors, host, path), index, list(host), path)

    def flush(self) -> None:
        """Wait for the layer write in flight (if any) and re-raise its error here."""
        if self._pending is None:
            return
        future, index, names, path = self._pending
        self._pending = None
        future.result()
        self._record(index, names, path)

    def _record(self, index: int, names: list[str], path: Path) -> None:
        self.written |= dict.fromkeys(names, path.name)
        self.sources[index] = Shards.of(path.parent, dict.fromkeys(names, path))
        self.release(index)

    def save(self, model, out: Path) -> None:
        """The tensors outside the layers, config and index; every layer must have been written to `out`."""
        self.flush()
        missing = [i for i, s in enumerate(self.sources) if s.directory != out]
        if missing:
            raise RuntimeError(f"streamed layers {missing[:5]} were not written to {out}")
        layers = self.adapter.layers_path + "."
        rest = {k: v for k, v in model.state_dict().items() if not k.startswith(layers)}
        if getattr(model.config, "tie_word_embeddings", False):
            rest.pop(self.adapter.lm_head_path + ".weight", None)
        file = shard_name(1, self.n + 1)
        write_safetensors(rest, out / file)
        weight_map = dict.fromkeys(rest, file) | self.written
        total = sum(t.numel() * t.element_size() for t in rest.values())
        for i in range(self.n):
            total += sum(t.numel() * t.element_size() for t in self.layers[i].state_dict().values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        tmp = out / f".tmp-{INDEX}"
        tmp.write_text(json.dumps(index, indent=2))
        tmp.replace(out / INDEX)
        model.config.save_pretrained(out)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(out)

    def _onload_hook(self, layer, args, kwargs):
        if next(layer.parameters()).is_meta:
            hidden = args[0] if args else kwargs["hidden_states"]
            self.onload(layer._dscompress_index, hidden.device)
            layer._dscompress_onloaded = True  # held for this forward only

    def _release_hook(self, layer, args, output):
        if getattr(layer, "_dscompress_onloaded", False):
            layer._dscompress_onloaded = False
            self.release(layer._dscompress_index)


def read_layer(source: Shards, prefix: str, device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One layer's tensors under `prefix`, as the module holds them (names relative to it, floats in `dtype`),
    refusing NaN or infinite values. A routed expert's projections are copied one by one into the stacked
    tensors, allocated once on `device`: the layer is never there twice."""
    out, experts = {}, defaultdict(lambda: defaultdict(dict))
    for name in source.under(prefix):
        if m := _EXPERT.match(name):
            experts[m["p"]][m["w"]][int(m["e"])] = name
        else:
            t = source.get(name, device)
            out[name[len(prefix) :]] = t.to(device, dtype) if t.is_floating_point() else t.to(device)
    for path, parts in experts.items():
        n = len(parts["down_proj"])
        (i, h), (h2, i2) = source.shape(parts["gate_proj"][0]), source.shape(parts["down_proj"][0])
        gate_up = torch.empty(n, 2 * i, h, device=device, dtype=dtype)
        down = torch.empty(n, h2, i2, device=device, dtype=dtype)
        for e in range(n):
            gate_up[e, :i].copy_(source.get(parts["gate_proj"][e], device))
            gate_up[e, i:].copy_(source.get(parts["up_proj"][e], device))
            down[e].copy_(source.get(parts["down_proj"][e], device))
        local = path[len(prefix) :]
        out[f"{local}.gate_up_proj"], out[f"{local}.down_proj"] = gate_up, down
    check_finite(source.directory, _Named(out, prefix))
    return out


def layer_shards(directory: Path, n: int) -> list[Shards]:
    """The shards `Stream.write_layer` wrote to `directory` for each of `n` layers."""
    out = []
    for i in range(n):
        path = directory / shard_name(i + 2, n + 1)
        with safe_open(str(path), "pt") as f:
            out.append(Shards.of(directory, dict.fromkeys(f.keys(), path)))
    return out


def load_layers(model, adapter, directory: Path) -> None:
    """Copy every layer written by `Stream.write_layer` into `directory` into an in-memory model."""
    layers = adapter.layers(model)
    dtype = next(model.parameters()).dtype
    for i, source in enumerate(layer_shards(directory, len(layers))):
        layers[i].load_state_dict(read_layer(source, f"{adapter.layers_path}.{i}.", "cpu", dtype), strict=True)


class _Named:
    """check_finite's view of one layer's tensors under their full names."""

    def __init__(self, tensors: dict, prefix: str):
        self.tensors, self.prefix = tensors, prefix

    def state_dict(self) -> dict:
        return {self.prefix + k: v for k, v in self.tensors.items()}


def shard_name(k: int, n: int) -> str:
    return f"model-{k:05d}-of-{n:05d}.safetensors"


def stream_of(model) -> Stream | None:
    """The model's Stream when it was loaded with `load_streamed`."""
    return getattr(model, "_dscompress_stream", None)


def place(model, device):
    """`model.to(device)`, except that streamed layers stay where they are (they go where their input is)."""
    stream = stream_of(model)
    if stream is None:
        return model.to(device)
    parent, attr = stream.adapter.layers_path.rsplit(".", 1)
    backbone = model.get_submodule(parent)
    setattr(backbone, attr, torch.nn.ModuleList())
    try:
        model.to(device)
    finally:
        setattr(backbone, attr, stream.layers)
    return model


def load_streamed(directory: Path, dtype: str = "float32", trust_remote_code: bool = False):
    """The model of a checked checkpoint folder with its decoder layers on the meta device (read when they
    run); the same refusals as `load_model` (remote code, missing, unexpected or misshapen tensors, NaN)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from dscompress.models.adapters import adapter_for

    config = load_config(directory, trust_remote_code)
    if fp8_config(read_config_json(directory)):  # read as bf16 (Shards dequantizes); what is written is not FP8
        del config.quantization_config
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    adapter = adapter_for(model.config)
    try:
        shards = Shards(directory)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelSourceError(f"{directory}: cannot read its safetensors shards ({exc})") from None
    check_names(directory, model, adapter, shards)
    layers = adapter.layers_path + "."
    rest = [n for n in shards.files if not n.startswith(layers) and n in model.state_dict()]
    tensors = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in shards.read(rest).items()}
    check_finite(directory, _Named(tensors, ""))
    model.load_state_dict(tensors, strict=False, assign=True)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    model._dscompress_stream = Stream(model, adapter, shards, DTYPES[dtype])
    return model.eval()


def check_names(directory: Path, model, adapter, shards: Shards) -> None:
    """check_complete's refusals, from the shard headers against the architecture's tensors (disk names): a
    checkpoint that only loads through transformers' key mapping (other prefixes) cannot be streamed."""
    expected = {k: tuple(v.shape) for k, v in to_disk(model.state_dict()).items()}
    if getattr(model.config, "tie_word_embeddings", False):
        expected.pop(adapter.lm_head_path + ".weight", None)
    found = shards.shapes()
    check_complete(directory, {
        "missing_keys": sorted(set(expected) - set(found)),
        "unexpected_keys": sorted(set(found) - set(expected)),
        "mismatched_keys": sorted(k for k in set(expected) & set(found) if expected[k] != found[k]),
    }, model)  # fmt: skip
