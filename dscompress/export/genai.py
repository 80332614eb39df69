"""The `ort-genai` target: the `onnx-ort` graph as a folder that ONNX Runtime GenAI opens (`og.Model(DIR)`).

What ORT GenAI needs beyond the graph (its config reference, onnxruntime.ai/docs/genai/reference/config.html):
- `genai_config.json`: the model type, context length, vocabulary, special tokens, the decoder's file, its head
  counts and sizes, the names of its inputs and outputs, and the search defaults (greedy);
- the cache under the conventional names, `past_key_values.{i}.key/value` in and `present.{i}.key/value` out
  (what optimum and ORT GenAI's own model builder write; our other targets keep `past.{i}.*`);
- `past_present_share_buffer: false`: our graph appends to the cache with Concat, where the builder's
  GroupQueryAttention writes into a preallocated buffer;
- the Hugging Face tokenizer files, which ORT GenAI reads itself.
ORT GenAI allocates one cache shape for keys and values (heads x head_size), so DeepSeek-V3's MLA cache (a
512-wide compressed key and a 64-wide rope part) cannot be described to it: refused before exporting.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx

from dscompress.export.onnx import ExportError

PAST = "past_key_values.%d.%s"
# transformers model_type -> ORT GenAI model type (decoder-only types it runs with a standard KV cache)
GENAI_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3"}
CONFIG_FILE = "genai_config.json"


def check_genai(stage: Path) -> None:
    """Refuse, from config.json alone, an architecture ORT GenAI cannot run from our graph."""
    model_type = json.loads((stage / "config.json").read_text()).get("model_type")
    if model_type not in GENAI_TYPES:
        why = ("its MLA cache has different key and value widths, and ORT GenAI allocates one shape for both"
               if model_type == "deepseek_v3" else "ORT GenAI has no model type for it")  # fmt: skip
        raise ExportError(
            f"the ort-genai target cannot describe a {model_type} model: {why}; allowed architectures: "
            f"{', '.join(GENAI_TYPES)}. Fix: export --format onnx-ort and run it with ONNX Runtime"
        )


def rename_cache(proto: onnx.ModelProto, layers: int) -> list[str]:
    """Graph inputs past.{i}.key/value -> past_key_values.{i}.key/value (wherever they are read); the new names."""
    mapping = {f"past.{i}.{kv}": PAST % (i, kv) for i in range(layers) for kv in ("key", "value")}
    graph = proto.graph
    for value in graph.input:
        value.name = mapping.get(value.name, value.name)
    for node in graph.node:
        for j, name in enumerate(node.input):
            if name in mapping:
                node.input[j] = mapping[name]
    return [mapping.get(i, i) for i in (v.name for v in graph.input)]


def write_config(out: Path, stage: Path, meta: dict, max_length: int) -> None:
    """genai_config.json for the graph in `out`, from the stage's config and the export's cache layout."""
    config = json.loads((stage / "config.json").read_text())
    generation = json.loads((stage / "generation_config.json").read_text()) if (
        stage / "generation_config.json").exists() else {}  # fmt: skip
    text = config.get("text_config", config)
    layout = meta["layout"]
    eos = generation.get("eos_token_id", text.get("eos_token_id"))
    pad = generation.get("pad_token_id", text.get("pad_token_id"))
    context = int(text.get("max_position_embeddings") or max_length)
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": "model.onnx",
        "head_size": layout["key"][1],
        "hidden_size": text["hidden_size"],
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                   "past_key_names": PAST.replace("%s", "key"), "past_value_names": PAST.replace("%s", "value")},
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value"},
        "num_attention_heads": text["num_attention_heads"],
        "num_hidden_layers": layout["layers"],
        "num_key_value_heads": layout["key"][0],
    }  # fmt: skip
    model = {
        "bos_token_id": generation.get("bos_token_id", text.get("bos_token_id")),
        "context_length": context,
        "decoder": decoder,
        "eos_token_id": eos,
        "pad_token_id": pad if pad is not None else (eos[0] if isinstance(eos, list) else eos),
        "type": GENAI_TYPES[config["model_type"]],
        "vocab_size": text["vocab_size"],
    }
    search = {
        "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
        "max_length": min(context, max_length), "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
        "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
        "temperature": 1.0, "top_k": 1, "top_p": 1.0,
    }  # fmt: skip
    (out / CONFIG_FILE).write_text(json.dumps({"model": model, "search": search}, indent=2) + "\n")


def genai_greedy(directory: Path, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy continuation of `prompt` by ONNX Runtime GenAI itself from the export folder (tests, parity)."""
    import onnxruntime_genai as og

    model = og.Model(str(directory))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    tokens = []
    while not generator.is_done() and len(tokens) < new_tokens:
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens
