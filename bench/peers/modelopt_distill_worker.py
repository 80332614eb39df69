"""modelopt.torch.distill worker for bench_distill.py: the same student, teacher, windows, sample order, token
budget, optimizer and schedule as dscompress's distill stage, trained through modelopt's DistillationModel
(mtd.convert with a logits KL criterion), then scored like every other row."""

import math

import modelopt.torch.distill as mtd
import torch
from common import Timer, finish, job, score
from transformers import AutoModelForCausalLM

spec = job()
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
cfg = spec["config"]
teacher = AutoModelForCausalLM.from_pretrained(spec["teacher"], dtype=torch.float32).to(device).eval()
student = AutoModelForCausalLM.from_pretrained(spec["student"], dtype=torch.float32).to(device)


class CausalLMLogits(mtd.LogitsDistillationLoss):
    """modelopt's logits KL on the `.logits` of Hugging Face causal-LM outputs, tokens flattened into the batch."""

    def forward(self, out_student, out_teacher):
        return super().forward(out_student.logits.flatten(0, 1), out_teacher.logits.flatten(0, 1))


# batchmean over flattened tokens: the per-token mean, as dscompress (the default "mean" also divides by the
# vocabulary size; batchmean on (B, T, V) would sum over T)
criterion = CausalLMLogits(temperature=cfg["temperature"], reduction="batchmean")
kd = {"teacher_model": teacher, "criterion": criterion, "loss_balancer": None}
model = mtd.convert(student, mode=[("kd_loss", kd)])
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg["lr"],
                              weight_decay=cfg["weight_decay"])  # fmt: skip
order, batch, steps = spec["order"], cfg["batch_size"], spec["steps"]


def lr_factor(step):  # the same warmup + cosine as dscompress
    if step < cfg["warmup_steps"]:
        return (step + 1) / cfg["warmup_steps"]
    progress = min(1.0, (step - cfg["warmup_steps"]) / max(1, steps - cfg["warmup_steps"]))
    return cfg["min_lr_ratio"] + (1 - cfg["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * progress))


bf16 = device.type == "cuda"
model.train()
with Timer() as t:
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cfg["lr"] * lr_factor(step)
        ids = spec["train"][order[step * batch : (step + 1) * batch]].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            model(input_ids=ids, use_cache=False)
            loss = model.compute_kd_loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["max_grad_norm"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
trained = mtd.export(model).eval()
with torch.no_grad():
    metrics = score(lambda ids: trained(ids.to(device)).logits.cpu(), spec)
tokens = steps * batch * spec["train"].shape[1]
finish(
    spec,
    seconds=t.seconds,
    tokens=tokens,
    tokens_per_s=tokens / t.seconds,
    final_loss=float(loss.detach()),
    peak_gpu_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
    **metrics,
)
