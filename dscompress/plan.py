"""Checks that need the model's shapes (not its weights), and the dry-run plan: stages, memory, disk."""

from __future__ import annotations

from dscompress.compress.distill.apply import teacher_problem
from dscompress.compress.prune.advice import advice
from dscompress.compress.prune.sizes import pruned_config
from dscompress.compress.selection import selected
from dscompress.errors import RecipeError
from dscompress.export.preflight import roofline, target_problems
from dscompress.models.info import DTYPE_BYTES, ModelInfo, inspect_config
from dscompress.quant.qstate import quantized_bytes
from dscompress.recipe import Recipe
from dscompress.registry import spec_for
from dscompress.yamlpaths import LocatedYaml, format_loc


def model_problems(recipe: Recipe, located: LocatedYaml | None, info: ModelInfo) -> list[str]:
    """Every recipe problem that only the model's config reveals, as 'file:line: path: message' lines."""
    problems: list[tuple[tuple, str]] = []
    for split in ("eval", "calibration", "train"):
        seq_len = getattr(recipe.data, split).seq_len
        if info.max_positions and seq_len > info.max_positions:
            problems.append((
                ("data", split, "seq_len"),
                f"{seq_len} is above the model's maximum of {info.max_positions} positions; "
                f"use at most {info.max_positions}",
            ))  # fmt: skip

    problems += _stream_problems(recipe)
    labels, stage_info = ["baseline"], info
    for i, stage in enumerate(recipe.stages):
        spec = spec_for(stage.pass_config)
        found = spec.check(stage.pass_config, stage_info)
        if spec.trains and (message := teacher_problem(stage.distill.teacher, labels, stage_info)):
            found.append(("teacher", message))
        problems += [(("stages", i, spec.key, field), message) for field, message in found]
        if spec.reshapes and not found:
            stage_info = _pruned_info(stage_info, stage.pass_config)  # later stages see the pruned shapes
        labels.append(stage.label)

    if recipe.target is not None:
        problems += target_problems(recipe, info, make_plan(recipe, info))
    lines = []
    for loc, message in problems:
        where = located.where(loc) if located else "recipe"
        lines.append(f"{where}: {format_loc(loc)}: {message}")
    return lines


def _stream_problems(recipe: Recipe) -> list[tuple[tuple, str]]:
    """`model.stream: true` reads one decoder layer at a time: only the pass that works layer by layer takes it."""
    if not recipe.model.stream:
        return []
    found = []
    for i, stage in enumerate(recipe.stages):
        key = spec_for(stage.pass_config).key
        if key == "gptq" and stage.pass_config.rotate:
            found.append((("stages", i, key, "rotate"), "the rotation rewrites the whole model before the solve, and "
                          "model.stream: true keeps only one layer in memory. Fix: remove model.stream, or set "
                          "rotate: false"))  # fmt: skip
        elif key != "gptq":
            found.append((("stages", i, key), f"a {key} stage needs the whole model in memory, and model.stream: "
                          "true keeps only one layer there; gptq stages only. Fix: remove model.stream, or run "
                          "this stage in a second recipe on the gptq stage's output"))  # fmt: skip
    return found


def check_against_model(recipe: Recipe, located: LocatedYaml | None, info: ModelInfo) -> None:
    problems = model_problems(recipe, located, info)
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        err = RecipeError(problems[0] + more)
        err.all_messages = problems
        raise err


RUNTIME_BYTES = 1 << 30  # torch + transformers + tokenizer, measured ~1 GB RSS before any model is loaded


def _distill_bytes(cfg, student: ModelInfo, teacher_bytes: int, seq_len: int) -> int:
    """Per device: the fp32 student with gradients and two AdamW moments (LoRA: frozen, adapters trained), the
    teacher, a micro-batch of student and teacher logits (the chunked KL keeps only those two full-size), and the
    student's saved activations (about 8 bytes per token for each hidden and MLP channel of every layer: a rough
    fp32 estimate)."""
    text = student.config.get_text_config()
    tokens = cfg.batch_size // cfg.grad_accum * seq_len
    logits = 2 * tokens * student.vocab_size * 4
    width = 4 * text.hidden_size + 3 * (getattr(text, "intermediate_size", 0) or 0)
    activations = tokens * text.num_hidden_layers * width * 8
    return _trained_bytes(cfg, student) + teacher_bytes + logits + activations + RUNTIME_BYTES


def _trained_bytes(cfg, student: ModelInfo) -> int:
    """16 bytes (fp32 weight, gradient, two moments) per trained parameter; with LoRA the student is frozen (4
    bytes each) and the adapters train: rank x (in + out) per adapted decoder Linear."""
    if cfg.lora is None:
        return 16 * student.n_params
    wanted = cfg.lora.targets
    adapted = [t for t in student.targets if t.kind == "linear" and t.layer >= 0
               and (wanted == "all-linear" or t.name.rsplit(".", 1)[-1] in wanted)]  # fmt: skip
    adapter_params = sum(cfg.lora.rank * (t.in_features + t.param.shape[0]) for t in adapted)
    return 4 * student.n_params + 16 * adapter_params


def _pruned_info(info: ModelInfo, cfg) -> ModelInfo:
    """The model after a prune stage. Depth pruning of an MoE model counts the last layers as the removed ones
    (which layers go is decided by calibration)."""
    layers = info.config.get_text_config().num_hidden_layers
    keep = cfg.depth.keep(layers) if cfg.depth else layers
    return inspect_config(pruned_config(info.config, info.adapter, cfg, list(range(keep))))


def _gptq_peak(recipe: Recipe, info: ModelInfo, cfg) -> dict:
    """The gptq pass's accelerator memory per device (compress/gptq/memory.py), before any expert budget."""
    from dscompress.compress.gptq.memory import accelerator_peak

    cal = recipe.data.calibration
    devices = cfg.devices if isinstance(cfg.devices, int) else 1
    return accelerator_peak(selected(info.targets, cfg.exclude), info.config.get_text_config().hidden_size,
                            cal.samples, cal.seq_len, cfg.batch_size, devices, DTYPE_BYTES[recipe.model.dtype],
                            awq=cfg.awq, gptaq=bool(cfg.gptaq))  # fmt: skip


def make_plan(recipe: Recipe, info: ModelInfo) -> dict:
    """Predicted sizes before any compute. Memory is a peak estimate for the largest step, not a bound."""
    dtype_bytes = DTYPE_BYTES[recipe.model.dtype]
    model_bytes = info.n_params * dtype_bytes
    ev, data = recipe.data.eval, recipe.data
    logits_bytes = data.batch_size * (ev.seq_len - 1) * info.vocab_size * 4 * 4  # logits, log-softmax, baseline
    ref_bytes = ev.samples * (ev.seq_len - 1) * (info.vocab_size * 2 + 4)  # float16 log-probs + int32 top-1
    stages, deployed, source_info, source_bytes = [], model_bytes, info, model_bytes
    for i, stage in enumerate(recipe.stages, start=1):
        cfg = stage.pass_config
        before = info.n_params
        spec = spec_for(cfg)
        if spec.reshapes:
            info = _pruned_info(info, cfg)
            model_bytes = deployed = info.n_params * dtype_bytes
        row = {"dir": f"{i}-{stage.label}", "pass": spec.key, "params": info.n_params}
        if spec.reshapes:
            row["removed_pct"] = 100.0 * (1 - info.n_params / before)
            row["advice"] = advice(1 - info.n_params / before, info.config.model_type)
        if spec.quantizes:
            chosen = selected(info.targets, cfg.exclude)
            q_params = sum(t.param.numel() for t in chosen)
            q_bytes = sum(quantized_bytes(t.param.numel(), cfg.bits, cfg.group_size, t.in_features) for t in chosen)
            deployed = model_bytes - q_params * dtype_bytes + q_bytes
            groups = sum(t.param.numel() // (t.in_features if cfg.group_size == -1 else cfg.group_size) for t in chosen)
            # the checkpoint keeps float weights, plus a float32 scale and an int32 zero per group
            row |= {"quantized_params": q_params, "checkpoint_bytes": model_bytes + 8 * groups}
        else:
            row["checkpoint_bytes"] = model_bytes
        if spec.key == "gptq" and isinstance(data.calibration.samples, int):
            row["accelerator_peak"] = _gptq_peak(recipe, info, cfg)
        if spec.trains:
            row["train_memory_bytes"] = _distill_bytes(cfg, info, source_bytes, recipe.data.train.seq_len)
        row["deployed_bytes"] = int(deployed)
        stages.append(row)

    host, how = 2 * source_bytes + logits_bytes + RUNTIME_BYTES, "two model copies (load + save)"
    if recipe.model.stream:  # everything outside the layers, one layer read and one being written
        from dscompress.compress.gptq.memory import layer_params

        per_layer = layer_params(source_info.targets)
        outside = source_info.n_params - sum(per_layer.values())
        host = (outside + 2 * max(per_layer.values(), default=0)) * dtype_bytes + logits_bytes + RUNTIME_BYTES
        how = "the tensors outside the decoder layers plus two layers (model.stream: one read, one written)"
    result = {
        "model": recipe.model.path,
        "architecture": info.adapter.model_type,
        "params": source_info.n_params,
        "model_bytes": source_bytes,
        "stages": stages,
        "peak_memory_bytes": max(host, *(s.get("train_memory_bytes", 0) for s in stages)),
        "disk_bytes": int(source_bytes + ref_bytes + sum(s["checkpoint_bytes"] for s in stages)),
        "baseline_logprobs_bytes": ref_bytes,
        "assumptions": "0-baseline holds a copy of the source that a write cannot follow back (counted in disk_bytes; "
        "no extra disk where the file system reflinks, or for non-root users hard-linking the read-only cache); "
        f"peak memory = {how} + two batches of logits (stage and baseline) "
        "+ about 1 GB for torch and transformers themselves",
    }
    result["roofline"] = roofline(recipe, info, result)
    return result
