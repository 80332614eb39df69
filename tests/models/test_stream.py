"""`model.stream: true`: decoder layers read from the shards one at a time, GPTQ writing each finished layer to
its own shard. The result must equal the in-memory run bit for bit and load in stock transformers."""

import json

import pytest
import torch
from conftest import cli_here, tiny_recipe
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dscompress
from dscompress.compress.gptq.config import GPTQConfig
from dscompress.compress.gptq.ranks import SingleRank
from dscompress.compress.gptq.solve import quantize
from dscompress.context import StageContext
from dscompress.errors import ModelSourceError
from dscompress.models.load import load_model
from dscompress.models.sources import resolve
from dscompress.models.stream import (
    Shards,
    load_streamed,
    place,
    read_layer,
    stream_of,
    to_disk,
    write_safetensors,
)

GPTQ = "  - gptq: {bits: 4, group_size: 32}\n    gate: {kl: {max: 5.0}}"
WINDOWS = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(1))


def _streamed_recipe(path, arch: str, stages: str = GPTQ, stream: bool = True):
    recipe = tiny_recipe(path, f"tiny:{arch}", stages)
    recipe.write_text(
        recipe.read_text().replace(f'path: "tiny:{arch}"', f'path: "tiny:{arch}", stream: {str(stream).lower()}')
    )
    return recipe


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "qwen3_moe", "deepseek_v3"])
def test_streamed_gptq_equals_the_in_memory_run_and_loads_in_transformers(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    reports, weights = {}, {}
    for stream in (False, True):
        recipe = _streamed_recipe(tmp_path / f"{stream}.yaml", arch, stream=stream)
        reports[stream] = dscompress.run(recipe, tmp_path / f"out-{stream}")
        weights[stream] = AutoModelForCausalLM.from_pretrained(str(tmp_path / f"out-{stream}" / "1-gptq")).state_dict()
    assert [s["metrics"] for s in reports[True]["stages"]] == [s["metrics"] for s in reports[False]["stages"]]
    assert weights[True].keys() == weights[False].keys()
    assert all(torch.equal(weights[True][k], weights[False][k]) for k in weights[True])
    stage = tmp_path / "out-True" / "1-gptq"
    index = json.loads((stage / "model.safetensors.index.json").read_text())
    layers = len(load_model(stage).model.layers)
    assert len(set(index["weight_map"].values())) == layers + 1  # one shard per layer, one for the rest
    assert oct((stage / f"model-00002-of-{layers + 1:05d}.safetensors").stat().st_mode)[-3:] == "644"


def test_a_streamed_forward_holds_no_layer_and_gives_the_same_logits():
    directory = resolve("tiny:qwen3_moe").directory
    whole, streamed = load_model(directory), load_streamed(directory)
    layers = streamed.model.layers
    assert all(p.is_meta for layer in layers for p in layer.parameters())
    with torch.no_grad():
        assert torch.equal(whole(WINDOWS).logits, place(streamed, "cpu")(WINDOWS).logits)
    assert all(p.is_meta for layer in layers for p in layer.parameters())  # each layer was dropped after it ran


def test_layers_written_in_the_background_read_back_and_a_failed_write_is_raised(tmp_path):
    """Small layers go to their shards from a background thread: reading one back waits for its write, and a
    write that fails (here: its folder is gone) raises at the next write or flush, never silently."""
    directory = resolve("tiny:llama").directory
    whole, streamed = load_model(directory), load_streamed(directory)
    stream = stream_of(streamed)
    stream.onload(0, "cpu")
    stream.write_layer(0, tmp_path)
    assert stream._pending is not None  # in flight: the background path, not the synchronous one
    layer = stream.onload(0, "cpu")  # waits for the write, then reads the new shard
    assert stream._pending is None and stream.sources[0].directory == tmp_path
    assert torch.equal(layer.self_attn.q_proj.weight, whole.model.layers[0].self_attn.q_proj.weight)
    stream.release(0)
    stream.onload(1, "cpu")
    stream.write_layer(1, tmp_path / "missing")
    with pytest.raises(FileNotFoundError):
        stream.flush()


def test_streamed_gptq_without_a_stage_folder_is_refused():
    model = load_streamed(resolve("tiny:llama").directory)
    with StageContext.standalone(model, WINDOWS, quiet=True) as ctx, pytest.raises(Exception, match="stage folder"):
        quantize(model, GPTQConfig(group_size=32), ctx, SingleRank())


def test_expert_layout_round_trips_between_disk_and_module():
    directory = resolve("tiny:deepseek_v3").directory
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        disk = {k: f.get_tensor(k) for k in f.keys() if k.startswith("model.layers.1.")}  # noqa: SIM118
    module = read_layer(Shards(directory), "model.layers.1.", "cpu", torch.float32)
    expected = {k[15:]: v for k, v in load_model(directory).state_dict().items() if k.startswith("model.layers.1.")}
    assert module.keys() == expected.keys() and "mlp.experts.gate_up_proj" in module
    assert all(torch.equal(module[k], expected[k]) for k in module)
    back = to_disk({f"model.layers.1.{k}": v for k, v in module.items()})
    assert back.keys() == disk.keys() and all(torch.equal(back[k], disk[k]) for k in disk)


def test_our_safetensors_writer_is_read_by_safetensors(tmp_path):
    tensors = {"a": torch.randn(3, 5, dtype=torch.bfloat16), "b": torch.arange(7, dtype=torch.int32),
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4)}  # fmt: skip
    write_safetensors(tensors, tmp_path / "x.safetensors")
    back = load_file(str(tmp_path / "x.safetensors"))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert not list(tmp_path.glob(".tmp-*"))


def test_a_streamed_checkpoint_is_checked_like_a_loaded_one(tmp_path):
    directory = resolve("tiny:llama").directory
    for f in directory.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelSourceError, match="is missing.*layers.1.mlp.up_proj"):
        load_streamed(tmp_path)
    expected = load_model(directory).state_dict()["model.layers.1.mlp.up_proj.weight"].shape
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.full(tuple(expected), float("nan"))
    save_file(tensors, str(tmp_path / "model.safetensors"))
    model = load_streamed(tmp_path)  # layers are checked when they are read
    with pytest.raises(ModelSourceError, match="NaN"), torch.no_grad():
        stream_of(model).onload(1, "cpu")


def test_stages_that_cannot_stream_are_refused_before_work(tmp_path):
    result = cli_here(
        "validate", str(_streamed_recipe(tmp_path / "r.yaml", "llama", "  - prune: {mlp: {ratio: 0.25}}"))
    )
    assert result.returncode == 2
    assert "r.yaml:9: stages[0].prune: a prune stage needs the whole model in memory" in result.stderr


def test_two_streaming_workers_write_the_stage_the_in_memory_two_worker_run_gives(tmp_path):
    """devices: 2 with model.stream: the gloo workers read each layer from the shards and rank 0 writes the
    stage's layer shards itself; the same result as two workers on in-memory models (who stream as well)."""
    stages = "  - gptq: {bits: 4, group_size: 32, devices: 2}\n    gate: {kl: {max: 5.0}}"
    out = {}
    for stream in (False, True):
        report = dscompress.run(_streamed_recipe(tmp_path / f"{stream}.yaml", "deepseek_v3", stages, stream),
                                tmp_path / f"out-{stream}")  # fmt: skip
        assert report["stages"][1]["summary"]["devices"] == 2
        out[stream] = load_model(tmp_path / f"out-{stream}" / "1-gptq").state_dict()
    assert all(torch.equal(out[True][k], out[False][k]) for k in out[False])
    plan = json.loads(cli_here("plan", "--json", str(tmp_path / "True.yaml")).stdout)
    whole = json.loads(cli_here("plan", "--json", str(tmp_path / "False.yaml")).stdout)
    assert plan["peak_memory_bytes"] < whole["peak_memory_bytes"]
    assert plan["stages"][0]["accelerator_peak"]["expert_budget_share"] > 0  # an MoE model: a share of free memory


def test_workers_get_a_copy_when_the_input_only_loads_through_key_mapping(tmp_path):
    """A checkpoint saved from the bare backbone (no `model.` prefix) loads in transformers, but cannot be read
    layer by layer under the model's names: devices: 2 writes the workers a copy instead of failing."""
    from dscompress.compress.gptq.apply import apply
    from dscompress.compress.gptq.dist import streamable

    source = resolve("tiny:llama").directory
    for f in source.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(source / "model.safetensors"))
    save_file({k.removeprefix("model."): v for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    model = load_model(tmp_path)
    with StageContext.standalone(model, WINDOWS, quiet=True, input_dir=tmp_path) as ctx:
        assert not streamable(tmp_path, model, ctx.adapter)
        out = apply(model, GPTQConfig(group_size=32, devices=2), ctx)
    assert out.summary["devices"] == 2 and len(out.quant.targets) == 14
