"""GPTQ (v1/v2) and compressed-tensors checkpoints: packing, zero-point conventions, exact round trips."""

import json

import pytest
import torch
from conftest import cli, tiny_recipe
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import dscompress
from dscompress.errors import ModelSourceError
from dscompress.export.formats import export
from dscompress.models.load import load_model
from dscompress.models.sources import resolve
from dscompress.quant.packing import decode_gptq, gptq_tensors, gptq_zero_convention, pack_codes, unpack_codes
from dscompress.quant.qstate import QuantState


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_pack_unpack_round_trip(bits, dim):
    codes = torch.randint(0, 1 << bits, (96, 64), generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits, dim)
    assert packed.dtype == torch.int32
    assert packed.shape[dim] == codes.shape[dim] * bits // 32
    assert torch.equal(unpack_codes(packed, bits, codes.shape, dim), codes.to(torch.int32))


def test_four_bit_packing_is_low_nibble_first():
    codes = torch.arange(8).reshape(8, 1)  # one output column, 8 inputs -> one int32 word
    assert int(pack_codes(codes, 4, dim=0)[0, 0]) == 0x76543210


@pytest.mark.parametrize("sym", [True, False])
def test_gptq_v1_and_v2_zero_points(sym):
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (8, 64))
    scale = (torch.rand(8, 2) + 0.01).half().float()
    zero = torch.full((8, 2), 8, dtype=torch.int32) if sym else torch.randint(0, 16, (8, 2), dtype=torch.int32)
    v1, v2 = gptq_tensors(codes, scale, zero, 4, 32, v2=False), gptq_tensors(codes, scale, zero, 4, 32, v2=True)
    if sym:  # v1 stores 7 = 0x77777777 words, v2 stores 8
        assert int(v1["qzeros"][0, 0]) == 0x77777777 and int(v2["qzeros"][0, 0]) & 0xFFFFFFFF == 0x88888888
    for tensors, label in ((v1, "gptq"), (v2, "gptq_v2")):
        got_codes, got_scale, got_zero, gs = decode_gptq(tensors, 4, sym, label)
        assert gs == 32 and torch.equal(got_codes, codes.to(torch.int32)) and torch.equal(got_zero, zero)
        assert torch.equal(got_scale, scale)


def test_v2_zeros_in_a_checkpoint_labelled_v1_are_detected():
    zero = torch.full((8, 2), 8, dtype=torch.int32)
    tensors = gptq_tensors(torch.randint(0, 16, (8, 64)), torch.ones(8, 2), zero, 4, 32, v2=True)
    stored = unpack_codes(tensors["qzeros"], 4, (2, 8), dim=1).t()
    assert gptq_zero_convention(stored, 4, sym=True, label="gptq") == "v2"
    assert torch.equal(decode_gptq(tensors, 4, True, "gptq")[2], zero)


def test_permuted_g_idx_is_refused():
    tensors = gptq_tensors(torch.randint(0, 16, (8, 64)), torch.ones(8, 2), torch.full((8, 2), 8), 4, 32, True)
    tensors["g_idx"] = tensors["g_idx"].flip(0)
    with pytest.raises(ModelSourceError, match="permuted g_idx"):
        decode_gptq(tensors, 4, True, "gptq")


@pytest.fixture(scope="module")
def gptq_stages(tmp_path_factory):
    """A GPTQ stage of a dense and of an MoE tiny model, each with every packed format saved."""
    out = {}
    for arch, sym in (("llama", False), ("qwen3_moe", True)):
        tmp = tmp_path_factory.mktemp(arch)
        stages = (f"  - gptq: {{bits: 4, group_size: 32, symmetric: {str(sym).lower()}}}\n"
                  "    save_formats: [gptq, gptq_v2, compressed-tensors]")  # fmt: skip
        path = tiny_recipe(tmp / "r.yaml", f"tiny:{arch}", stages)
        dscompress.run(path, tmp / "out")
        out[arch] = tmp / "out" / "1-gptq"
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2", "compressed-tensors"])
def test_packed_checkpoints_import_back_exactly(gptq_stages, arch, fmt):
    stage = gptq_stages[arch]
    packed = stage / "packed" / fmt
    config = json.loads((packed / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == ("compressed-tensors" if fmt == "compressed-tensors" else "gptq")
    imported = resolve(str(packed)).directory  # enters the pipeline like any model source
    ours, theirs = load_model(stage).state_dict(), load_model(imported).state_dict()
    for name, meta in QuantState.load(stage).targets.items():  # quantized weights: bit-identical
        key = f"{name}.weight" if meta["kind"] == "linear" else name
        assert torch.equal(ours[key], theirs[key]), key
    a, b = QuantState.load(stage), QuantState.load(imported)
    assert a.targets.keys() == b.targets.keys() and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def test_compressed_tensors_own_decompressor_reads_our_asymmetric_layers(gptq_stages):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    stage = gptq_stages["llama"]
    packed = stage / "packed" / "compressed-tensors"
    qc = json.loads((packed / "config.json").read_text())["quantization_config"]
    scheme = QuantizationScheme(targets=["Linear"], weights=qc["config_groups"]["group_0"]["weights"])
    tensors = load_file(str(packed / "model.safetensors"))
    ours = load_model(stage).state_dict()
    module = "model.layers.1.mlp.down_proj"
    local = {k.removeprefix(module + "."): v for k, v in tensors.items() if k.startswith(module + ".")}
    weight = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
    assert torch.equal(weight, ours[f"{module}.weight"].to(weight.dtype))  # their dequantization runs in fp16


def test_stock_transformers_loads_our_compressed_tensors_checkpoint(gptq_stages):
    # Symmetric: transformers 5.24 + compressed-tensors 0.20 size the asymmetric zero-point parameter unpacked
    # while the compressor packs it, so their own asymmetric checkpoints fail to load there too.
    stage = gptq_stages["qwen3_moe"]
    theirs = AutoModelForCausalLM.from_pretrained(stage / "packed" / "compressed-tensors", dtype=torch.float32)
    ours = AutoModelForCausalLM.from_pretrained(stage, dtype=torch.float32)
    x = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = float((theirs(x).logits - ours(x).logits).abs().max())
    assert diff < 1e-2  # only the unquantized tensors differ: they are stored in float16


STOCK_LOAD = """
import sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], device_map="cpu", dtype=torch.float16)
kinds = {type(m).__name__ for n, m in model.named_modules() if n.endswith("q_proj")}
with torch.no_grad():
    logits = model(torch.arange(10, 42)[None]).logits.float()
save_file({"logits": logits.contiguous()}, sys.argv[2])
print(",".join(sorted(kinds)))
"""


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_stock_transformers_with_gptqmodel_loads_our_gptq_checkpoints(gptq_stages, fmt, tmp_path):
    """Stock `AutoModelForCausalLM.from_pretrained` (transformers' GPTQ integration: gptqmodel 7.6 + optimum, in a
    venv of their own over our torch and transformers, made once from PyPI) loads our asymmetric v1 and v2 packed
    checkpoints into its quantized Linears and computes our stage's logits (float16 there)."""
    import subprocess
    import sys
    from pathlib import Path

    from conftest import REPO

    sys.path.insert(0, str(REPO / "bench"))
    from overlay_venv import overlay_venv

    python = overlay_venv(Path.home() / ".cache" / "dscompress" / "test-venvs" / "gptqmodel-7.6.0",
                          ["gptqmodel==7.6.0", "optimum==2.3.0"])  # fmt: skip
    stage = gptq_stages["llama"]
    out = tmp_path / "logits.safetensors"
    done = subprocess.run([str(python), "-c", STOCK_LOAD, str(stage / "packed" / fmt), str(out)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "MISSING" not in done.stderr and "UNEXPECTED" not in done.stderr, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] != "Linear"  # gptqmodel's quantized Linear, not a float one
    theirs = load_file(str(out))["logits"]
    ours = AutoModelForCausalLM.from_pretrained(stage, dtype=torch.float32)
    with torch.no_grad():
        ref = ours(torch.arange(10, 42)[None]).logits
    assert float((theirs - ref).abs().max()) < 1e-2 * float(ref.abs().max())
    assert torch.equal(theirs.argmax(-1), ref.argmax(-1))


def test_gptq_checkpoints_of_moe_models_get_a_note(tmp_path):
    """Stock transformers keeps MoE experts fused and leaves per-expert GPTQ tensors unloaded: validate says so."""
    stages = "  - gptq: {bits: 4, group_size: 32}\n    save_formats: [gptq, compressed-tensors]"
    result = cli("validate", str(tiny_recipe(tmp_path / "r.yaml", "tiny:qwen3_moe", stages)))
    assert result.returncode == 0 and "note: stages[0].save_formats: gptq" in result.stderr
    assert "experts left uninitialized" in result.stderr and "compressed-tensors" in result.stderr
    dense = cli("validate", str(tiny_recipe(tmp_path / "d.yaml", "tiny:qwen2", stages)))
    assert dense.returncode == 0 and "note:" not in dense.stderr


def test_gptq_files_have_the_documented_shapes(gptq_stages):
    tensors = load_file(str(gptq_stages["llama"] / "packed" / "gptq" / "model.safetensors"))
    q = "model.layers.0.self_attn.q_proj"
    assert tensors[f"{q}.qweight"].shape == (128 * 4 // 32, 128) and tensors[f"{q}.qweight"].dtype == torch.int32
    assert tensors[f"{q}.qzeros"].shape == (4, 128 * 4 // 32)
    assert tensors[f"{q}.scales"].shape == (4, 128) and tensors[f"{q}.scales"].dtype == torch.float16
    assert torch.equal(tensors[f"{q}.g_idx"], (torch.arange(128) // 32).to(torch.int32))
    assert f"{q}.weight" not in tensors and "model.embed_tokens.weight" in tensors  # tied lm_head: not stored


def test_export_command_and_bad_format(gptq_stages, tmp_path):
    result = cli("export", str(gptq_stages["llama"]), "--format", "gptq_v2", "--out", str(tmp_path / "p"))
    assert result.returncode == 0, result.stderr
    assert (
        json.loads((tmp_path / "p" / "config.json").read_text())["quantization_config"]["checkpoint_format"]
        == "gptq_v2"
    )
    bad = cli("export", str(gptq_stages["llama"]), "--format", "awq", "--out", str(tmp_path / "q"))
    assert bad.returncode == 2 and "'awq' is not one of" in bad.stderr and "compressed-tensors" in bad.stderr


def test_unquantized_stage_cannot_be_packed(tmp_path):
    with pytest.raises(ModelSourceError, match="not a quantized stage"):
        export(resolve("tiny:llama").directory, tmp_path / "x", "gptq")


def test_unknown_quantization_config_is_refused(tmp_path):
    model = resolve("tiny:llama").directory
    for f in model.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(load_file(str(model / "model.safetensors")), str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelSourceError, match="'awq'.*cannot be imported"):
        resolve(str(tmp_path))


def test_asymmetric_compressed_tensors_gets_a_note_and_files_are_readable_by_others(tmp_path):
    """The note that replaces a promise the stock loader does not keep; and weights 0644, not safetensors' 0600."""
    from conftest import cli_here, tiny_recipe

    stages = "  - rtn: {bits: 4, group_size: 32, symmetric: false}\n    save_formats: [compressed-tensors]"
    recipe = tiny_recipe(tmp_path / "r.yaml", stages=stages)
    result = cli_here("validate", str(recipe))
    assert result.returncode == 0 and "note: stages[0].save_formats" in result.stderr
    assert "stock transformers" in result.stderr and "symmetric: true" in result.stderr
    import dscompress

    report = dscompress.run(recipe, tmp_path / "out")
    assert len(report["notes"]) == 1
    for f in (tmp_path / "out" / "1-rtn").rglob("*.safetensors"):
        assert f.stat().st_mode & 0o044 == 0o044, f  # group and others may read
