"""`distill` pass: the student (the stage's input) learns the teacher's next-token distribution.

Loss: forward KL(teacher || student) on logits at `temperature` (times T^2), optionally mixed with cross-entropy
on the text (`ce_weight`), plus an optional hidden-state loss (MSE or cosine) on chosen student layers.

Layer mapping (student layer j -> teacher layer): when the student came from a `prune` stage of this teacher,
its manifest's `kept_layers` says which teacher layer each student layer was; otherwise layers are aligned by
depth, j -> round((j + 1) * L_teacher / L_student) - 1. Width: after hidden pruning the teacher's hidden
states are read at the student's kept channels (`kept.hidden` in the prune stage's importance.safetensors);
any other width mismatch gets a learned linear projection that is trained with the student and then dropped.

Quantized students (an rtn/gptq stage as input) keep their grid: `quantized: ste` trains through fake
quantization on the stored scales with a straight-through estimator and snaps onto the grid at the end (same
scales, zero points and metadata); `quantized: requantize` trains in float, then re-runs round-to-nearest with
the stage's bits, group size and symmetry (new scales). W8A8 students are refused: their activation scales were
calibrated on the old weights; distill first, then run int8.

The setup is loop.py and the training loop train.py; `devices` > 1 launches it under torch.distributed
(accelerate, DDP).
"""

from __future__ import annotations

from dscompress.compress.distill import loop as distill_loop
from dscompress.compress.distill.config import DistillConfig
from dscompress.context import PassOutput, StageContext
from dscompress.errors import DscompressError
from dscompress.models.info import inspect_model
from dscompress.models.sources import resolve


def check(config: DistillConfig, info) -> list[tuple[str, str]]:
    layers = info.config.get_text_config().num_hidden_layers
    problems = []
    if config.hidden and (bad := [i for i in config.hidden.layers if not 0 <= i < layers]):
        problems.append(("hidden.layers", f"{bad} are not student layers (0..{layers - 1})"))
    if config.lora and config.lora.targets != "all-linear":
        names = sorted({t.name.rsplit(".", 1)[-1] for t in info.targets if t.kind == "linear" and t.layer >= 0})
        if bad := [x for x in config.lora.targets if x not in names]:
            problems.append(("lora.targets", f"{bad} name no decoder Linear of this model; allowed: all-linear or "
                                             f"some of {', '.join(names)}"))  # fmt: skip
    return problems


def teacher_problem(teacher: str, earlier: list[str], info) -> str | None:
    """A teacher that is neither 'baseline', an earlier stage, nor a checkpoint with the student's vocabulary."""
    if teacher in earlier:
        return None
    if "/" not in teacher and not teacher.endswith(".gguf"):
        return f"{teacher!r} is not an earlier stage; allowed: {', '.join(earlier)}, or a checkpoint path"
    try:
        vocab = inspect_model(resolve(teacher).directory).vocab_size
    except DscompressError as exc:
        return str(exc)
    if vocab != info.vocab_size:
        return (f"{teacher} has a vocabulary of {vocab} and the student {info.vocab_size}; distillation matches "
                "next-token distributions, so both need the same tokenizer")  # fmt: skip
    return None


def apply(model, config: DistillConfig, ctx: StageContext) -> PassOutput:
    job = distill_loop.prepare(model, config, ctx)
    result = distill_loop.run(job, model, ctx)
    return PassOutput(result.model, quant=result.quant, summary=result.summary, quant_invalidated=False)
