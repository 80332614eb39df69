import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from dscompress.errors import ModelSourceError
from dscompress.models.adapters import ADAPTERS, adapter_for
from dscompress.models.load import load_config, load_model
from dscompress.models.sources import check_checkpoint_dir, resolve
from dscompress.models.tiny import TINY_ARCHS, tiny_config


def save_random(config, directory):
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


def test_missing_path(tmp_path):
    with pytest.raises(ModelSourceError, match="model path not found"):
        resolve(str(tmp_path / "nowhere"))


def test_pickle_only_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ModelSourceError, match="only pickle weights .*pytorch_model.bin.*safetensors only"):
        check_checkpoint_dir(tmp_path)


def test_truncated_safetensors_is_refused(tmp_path):
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2)  # fmt: skip
    save_random(config, tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelSourceError, match="truncated safetensors"):
        resolve(str(tmp_path))
    weights.write_bytes(b"garbage!")
    with pytest.raises(ModelSourceError, match="corrupt safetensors"):
        resolve(str(tmp_path))


def test_unsupported_architecture(tmp_path):
    save_random(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64), tmp_path)
    with pytest.raises(ModelSourceError, match="unsupported architecture 'gpt2'; dscompress supports deepseek_v3"):
        adapter_for(load_config(resolve(str(tmp_path)).directory))


def test_remote_code_needs_opt_in(tmp_path):
    save_random(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2), tmp_path)  # fmt: skip
    config = (
        (tmp_path / "config.json").read_text().replace('"architectures"', '"auto_map": {"x": "y"},\n"architectures"')
    )
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(ModelSourceError, match="trust_remote_code: true"):
        load_model(tmp_path)


def test_unknown_named_sources():
    with pytest.raises(ModelSourceError, match="unknown tiny model"):
        resolve("tiny:gpt2")
    with pytest.raises(ModelSourceError, match="unknown bundled model"):
        resolve("bundled:llama-70b")


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_models_load_and_match_their_adapter(arch):
    directory = resolve(f"tiny:{arch}").directory
    model = load_model(directory)
    adapter = adapter_for(model.config)
    assert adapter is ADAPTERS[arch]
    layers = adapter.layers(model)
    for i, layer in enumerate(layers):
        # the config-derived MoE flag must agree with the module tree the modeling code built
        assert adapter.is_moe_layer(model.config, i) == hasattr(layer.mlp, "experts")
    targets = list(adapter.weight_targets(model))
    assert targets[-1].name == "lm_head"
    kinds = {t.kind for t in targets}
    assert kinds == ({"linear", "experts"} if arch in ("qwen3_moe", "deepseek_v3") else {"linear"})
    heads = adapter.head_counts(model.config)
    assert heads.num_heads % heads.num_kv_heads == 0
    assert adapter.tied_embeddings(model) == bool(tiny_config(arch).tie_word_embeddings)
    # every attention projection the architecture has is found by the adapter
    names = {t.name.rsplit(".", 1)[-1] for t in targets if t.layer == 0}
    expected = {"o_proj"} | ({"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"}
                             if arch == "deepseek_v3" else {"q_proj", "k_proj", "v_proj"})  # fmt: skip
    assert expected <= names


def test_a_second_process_waits_for_the_cache_entry_another_is_building(tmp_path, monkeypatch):
    """Two processes asking for one model build it once: the second waits on the entry's lock (here held by the
    test) and builds only once the first lets go, instead of both writing the same temporary files."""
    import os
    import subprocess
    import sys

    from dscompress.models.sources import SEAL, cache_root, entry_lock

    monkeypatch.setenv("DSCOMPRESS_CACHE", str(tmp_path))
    target = cache_root() / "models" / "tiny-llama"
    code = "from dscompress.models.sources import resolve; print(resolve('tiny:llama', on_step=print).directory)"
    command = [sys.executable, "-u", "-c", code]
    with entry_lock(target):
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=os.environ.copy())
        said = proc.stdout.readline()  # printed once the child finds the lock held, before it blocks
        assert said.strip() == "tiny-llama: another process is preparing it; waiting"
        assert proc.poll() is None and not target.exists()  # nothing is built while the lock is held
    out, _ = proc.communicate(timeout=120)  # released: the child builds it now
    assert proc.returncode == 0 and out.strip().splitlines()[-1] == str(target) and (target / SEAL).exists()
