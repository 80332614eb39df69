"""Tiny random-init models of every supported architecture, for fast tests and examples.

`tiny:<arch>` sources materialize one of these into the cache with a byte-level tokenizer (256 bytes plus an
end-of-text token, no merges), so the whole pipeline runs on them exactly as on a real checkpoint.
Widths are multiples of 128 so every group size (32, 64, 128) divides every projection.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

EOS = "<|endoftext|>"
_COMMON = dict(
    vocab_size=320,  # 257 byte-level tokens, padded
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=1024,
    eos_token_id=256,
    bos_token_id=256,
)


def tiny_config(arch: str) -> PretrainedConfig:
    """The tiny config of `arch` (one of TINY_ARCHS)."""
    if arch == "llama":
        return LlamaConfig(**_COMMON, num_key_value_heads=2, tie_word_embeddings=True)
    if arch == "qwen2":
        return Qwen2Config(**_COMMON, num_key_value_heads=2, tie_word_embeddings=False)
    if arch == "qwen3":
        return Qwen3Config(**_COMMON, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(
            **_COMMON, num_key_value_heads=2, head_dim=32, moe_intermediate_size=128, num_experts=4,
            num_experts_per_tok=2, tie_word_embeddings=False,
        )  # fmt: skip
    if arch == "deepseek_v3":
        common = {**_COMMON, "num_hidden_layers": 3}
        return DeepseekV3Config(
            **common, num_key_value_heads=4, moe_intermediate_size=128, n_routed_experts=4,
            num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=128,
            kv_lora_rank=128, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, n_group=1,
            topk_group=1, tie_word_embeddings=False,
        )  # fmt: skip
    raise KeyError(arch)


TINY_ARCHS = ("llama", "qwen2", "qwen3", "qwen3_moe", "deepseek_v3")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A lossless byte-level tokenizer: one token per UTF-8 byte, id 256 is end-of-text."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda ch: ord(ch))
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab[EOS] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, model_max_length=1024)


def write_tiny(arch: str, directory: Path, seed: int = 0) -> None:
    """Random-init `arch` with a fixed seed and save it, with its tokenizer, as a safetensors checkpoint."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    model.generation_config.pad_token_id = 256
    model.save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
