"""The distillation training loop, the same code on one process or under torch.distributed (accelerate DDP).

Data order is global and seeded: sample g of the run is window perm_e[g mod N] of epoch e = g div N, and every
optimizer step takes the next `batch_size` samples, split into `grad_accum` micro-batches and each of those
across ranks. The loss is a mean over equal shards, so 1 or N devices compute the same step (up to reduction
order), and a resumed run continues at the exact sample where its checkpoint stopped.

Checkpoints (every `checkpoint_every` steps, atomic directory swap): the student's weights, AdamW moments,
learned projections, the CPU/CUDA RNG states (safetensors), and step, tokens, schedule length and history
(JSON). No pickle anywhere.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from dscompress.atomic import atomic_dir, atomic_write_json


@dataclass
class Shapes:
    layer_map: list[int] | None = None  # student layer j -> teacher layer (hidden loss)
    hidden_index: list[int] | None = None  # teacher channels the student kept (hidden pruning)


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    total_steps: int | None = None
    elapsed_s: float = 0.0
    history: list = field(default_factory=list)  # {"step", "tokens", "loss", metrics...} at each evaluation
    stopped_by: str | None = None
    resumed_from: int = 0
    eval_s: float = 0.0  # of elapsed_s: evaluations (gate checks) and checkpoint writes, not training
    checkpoint_s: float = 0.0


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup, then cosine decay from 1 to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the n training windows in `epoch` (sample g is epoch_order(n, seed, g // n)[g % n])."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))


class _FullKD(torch.autograd.Function):
    """mean over tokens of KL(softmax(t / T) || softmax(s / T)) * T^2, in chunks of tokens.

    Nothing (B, T, V)-sized is kept for backward but the gradient itself, (softmax(s / T) - softmax(t / T)) * T / N,
    written chunk by chunk in the forward (where both softmaxes are at hand) in the logits' dtype: the float32
    temporaries of one chunk at a time instead of autograd's several full-size ones (a few GB against tens of GB
    at batch 32 x 512 with a 49k vocabulary), and the backward is one multiply instead of two more softmaxes."""

    CHUNK = 4096  # tokens per chunk: 800 MB of float32 temporaries at a 49k vocabulary

    @staticmethod
    def forward(ctx, student, teacher, temperature):
        s, t = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
        total = torch.zeros((), dtype=torch.float64, device=s.device)
        gradient = torch.empty_like(s)
        for i in range(0, len(s), _FullKD.CHUNK):
            s_logp = F.log_softmax(s[i : i + _FullKD.CHUNK].float() / temperature, dim=-1)
            t_logp = F.log_softmax(t[i : i + _FullKD.CHUNK].float() / temperature, dim=-1)
            p_t = t_logp.exp()
            total += (p_t * (t_logp - s_logp)).sum(dtype=torch.float64)
            gradient[i : i + _FullKD.CHUNK] = ((s_logp.exp() - p_t) * (temperature / len(s))).to(s.dtype)
        ctx.save_for_backward(gradient)
        ctx.shape = student.shape
        return (total / len(s) * temperature**2).float()

    @staticmethod
    def backward(ctx, grad):
        (gradient,) = ctx.saved_tensors
        return (gradient * grad.to(gradient.dtype)).reshape(ctx.shape), None, None


def kd_loss(student_logits: torch.Tensor, teacher, temperature: float) -> torch.Tensor:
    """Forward KL(teacher || student) per token, times T^2. `teacher` is logits (B, T, V) or a top-k pair
    (log-probs (B, T, k), indices (B, T, k)) at this temperature; top-k lumps the rest of the mass in one bucket."""
    if isinstance(teacher, torch.Tensor):
        return _FullKD.apply(student_logits, teacher.detach(), temperature)
    s_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t_logp, index = teacher[0].float(), teacher[1].long()
    s_top = s_logp.gather(-1, index)
    kl = (t_logp.exp() * (t_logp - s_top)).sum(-1)
    t_rest = (1 - t_logp.exp().sum(-1)).clamp_min(1e-12)
    s_rest = (1 - s_top.exp().sum(-1)).clamp_min(1e-12)
    kl = kl + t_rest * (t_rest.log() - s_rest.log())
    return kl.mean() * temperature**2


def hidden_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "mse":
        return F.mse_loss(student.float(), teacher.float())
    return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


class Capture:
    """Forward hooks keeping the outputs of chosen decoder layers."""

    def __init__(self, layers, indices: list[int]):
        self.out: dict[int, torch.Tensor] = {}
        self.handles = [layers[i].register_forward_hook(self._hook(i)) for i in indices]

    def _hook(self, i):
        def hook(module, args, output):
            self.out[i] = output[0] if isinstance(output, tuple) else output

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def weights(model, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The state dict with tied aliases (lm_head = embeddings) stored once: safetensors refuses shared memory.
    trainable_only: just the parameters that train (LoRA adapters), which is all a resume needs besides the input."""
    seen, out = set(), {}
    keep = {n for n, p in model.named_parameters() if p.requires_grad} if trainable_only else None
    for name, tensor in model.state_dict().items():
        if keep is not None and name not in keep:
            continue
        if tensor.data_ptr() not in seen or tensor.numel() == 0:
            seen.add(tensor.data_ptr())
            out[name] = tensor.detach().cpu().contiguous()
    return out


def load_weights(model, tensors: dict[str, torch.Tensor], trainable_only: bool = False) -> None:
    """Load what `weights` wrote; only tied aliases (and, trainable_only, frozen weights) may be missing."""
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    if trainable_only:
        missing = [k for k in missing if k in params and params[k].requires_grad]
    bad = [k for k in missing if k not in params or all(params[k] is not v for n, v in params.items() if n != k)]
    if bad or unexpected:
        raise RuntimeError(f"checkpoint does not match the student: missing {bad[:3]}, unexpected {unexpected[:3]}")


def save_checkpoint(path: Path, model, projections, optimizer, state: TrainState, adapters_only: bool = False) -> None:
    """Everything a resumed run needs, swapped in atomically (with LoRA: the adapters, not the frozen student)."""
    with atomic_dir(path) as tmp:
        save_file(weights(model, adapters_only), str(tmp / "student.safetensors"))
        tensors = {f"proj.{k}": v.detach().cpu() for k, v in projections.state_dict().items()}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for i, p in enumerate(params):
            for key, value in optimizer.state.get(p, {}).items():
                tensors[f"opt.{i}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
        tensors["rng.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        save_file(tensors, str(tmp / "state.safetensors"))
        atomic_write_json(tmp / "state.json", state.__dict__)


def load_checkpoint(path: Path, model, projections, optimizer, adapters_only: bool = False) -> TrainState | None:
    if not (path / "state.json").is_file():
        return None
    load_weights(model, load_file(str(path / "student.safetensors")), adapters_only)
    tensors = load_file(str(path / "state.safetensors"))
    projections.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("proj.")})
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, p in enumerate(params):
        found = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"opt.{i}.")}
        if found:
            on_device = optimizer.defaults.get("fused")  # the fused kernel keeps its step count on the device
            optimizer.state[p] = {k: v.to(p.device) if k != "step" or on_device else v for k, v in found.items()}
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    state = TrainState(**json.loads((path / "state.json").read_text()))
    state.resumed_from = state.step
    return state


@dataclass
class Loop:
    """One distillation run. `evaluate(model) -> (metrics, gate_met)` runs on rank 0 only."""

    acc: object  # accelerate.Accelerator
    student: torch.nn.Module
    teacher: Callable  # (rows, ids) -> teacher logits or top-k pair; also fills the teacher hidden capture
    windows: torch.Tensor
    cfg: object  # DistillConfig
    seed: int
    state_dir: Path
    evaluate: Callable[[torch.nn.Module], tuple[dict, bool]] | None
    on_progress: Callable[[dict], None] = lambda info: None
    projections: torch.nn.ModuleDict = field(default_factory=torch.nn.ModuleDict)
    capture: tuple | None = None  # (student Capture, teacher Capture, layer_map, hidden_index)
    state: TrainState = field(default_factory=TrainState)
    adapters_only: bool = False  # LoRA: only the adapters train (and are checkpointed)

    def __post_init__(self):
        self._perms: dict[int, torch.Tensor] = {}

    def _sample(self, g: int) -> int:
        n, epoch = len(self.windows), g // len(self.windows)
        if epoch not in self._perms:
            self._perms = {epoch: epoch_order(n, self.seed, epoch)}
        return int(self._perms[epoch][g % n])

    def _agree(self, value):
        """Rank 0's value on every rank (a broadcast: only where ranks can differ)."""
        if self.acc.num_processes == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def _loss(self, model, rows: list[int], ids: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        teacher_out = self.teacher(rows, ids)
        logits = model(input_ids=ids, use_cache=False).logits
        loss = kd_loss(logits, teacher_out, cfg.temperature)
        if cfg.ce_weight:
            ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            loss = (1 - cfg.ce_weight) * loss + cfg.ce_weight * ce
        if self.capture:
            student_cap, teacher_cap, layer_map, index = self.capture
            for j, s_h in student_cap.out.items():
                t_h = teacher_cap.out[layer_map[j]]
                t_h = t_h[..., index] if index is not None else t_h
                s_h = self.projections[str(j)](s_h) if str(j) in self.projections else s_h
                loss = loss + cfg.hidden.weight * hidden_loss(s_h, t_h, cfg.hidden.loss) / len(student_cap.out)
        return loss

    def _to_device(self, batch: torch.Tensor) -> torch.Tensor:
        """A copy from pageable host memory waits for the GPU to finish everything queued; from pinned memory it
        is queued like a kernel, so the host keeps launching the step's work ahead of the GPU."""
        if self.acc.device.type != "cuda":
            return batch.to(self.acc.device)
        return batch.pin_memory().to(self.acc.device, non_blocking=True)

    def _step(self, model, optimizer, params) -> torch.Tensor:
        """One optimizer step; the global mean loss as a device tensor (reading it waits for the step to finish,
        so the caller reads it only when it reports)."""
        cfg, acc, state = self.cfg, self.acc, self.state
        micro = cfg.batch_size // cfg.grad_accum
        total = state.total_steps or 10**9
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(state.step, cfg.warmup_steps, total, cfg.min_lr_ratio)
        loss_sum = torch.zeros((), device=acc.device)
        for a in range(cfg.grad_accum):
            base = state.step * cfg.batch_size + a * micro
            rows = [self._sample(base + r) for r in range(acc.process_index, micro, acc.num_processes)]
            ids = self._to_device(self.windows[rows])
            sync = contextlib.nullcontext() if a == cfg.grad_accum - 1 else acc.no_sync(model)
            with sync, acc.autocast():
                loss = self._loss(model, rows, ids) / cfg.grad_accum
                acc.backward(loss)
            loss_sum += loss.detach().float()
        if acc.num_processes > 1:  # the reported loss is the global mean, not rank 0's shard
            torch.distributed.all_reduce(loss_sum)
            loss_sum /= acc.num_processes
        acc.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.tokens += cfg.batch_size * self.windows.shape[1]
        return loss_sum

    def _stop_reason(self, started: float) -> str | None:
        cfg, state = self.cfg, self.state
        if state.total_steps is not None and state.step >= state.total_steps:
            return "tokens" if cfg.budget.tokens else "minutes"
        if cfg.budget.minutes and time.perf_counter() - started >= cfg.budget.minutes * 60:
            return "minutes"
        return None

    def _fix_schedule(self, started: float, first_step: int) -> None:
        """Minutes budget: after 3 timed steps, the schedule length is what the remaining time allows."""
        cfg, state = self.cfg, self.state
        tokens_steps = math.ceil(cfg.budget.tokens / (cfg.batch_size * self.windows.shape[1])) if cfg.budget.tokens \
            else None  # fmt: skip
        if state.total_steps is None and cfg.budget.minutes is None:
            state.total_steps = tokens_steps
        elif state.total_steps is None and state.step - first_step >= 3:
            per_step = (time.perf_counter() - started - state.elapsed_s) / (state.step - first_step)
            by_time = state.step + int((cfg.budget.minutes * 60 - (time.perf_counter() - started)) / per_step)
            state.total_steps = self._agree(min(by_time, tokens_steps or by_time))

    def _evaluate(self, model, loss: float | None) -> bool:
        stop, started = False, time.perf_counter()
        if self.acc.is_main_process and self.evaluate is not None:
            model.eval()
            # evaluation runs eager: compiled layers (distill's `compile`) are specialized to the training step, and
            # the evaluation's other shapes and KV cache would recompile them per layer
            with torch.no_grad(), torch.compiler.set_stance("force_eager"):
                metrics, met = self.evaluate(self.acc.unwrap_model(model))
            model.train()
            train_s = self.state.elapsed_s - self.state.eval_s - self.state.checkpoint_s
            self.state.history.append({**metrics, "step": self.state.step, "tokens": self.state.tokens,
                                       "loss": loss, "gate_met": met, "train_seconds": train_s})  # fmt: skip
            stop = met and self.cfg.stop_when_gate_met
        stop = self._agree(stop)
        self.state.eval_s += time.perf_counter() - started
        return stop

    def _checkpoint(self, model, optimizer) -> None:
        started = time.perf_counter()
        if self.acc.is_main_process:
            save_checkpoint(self.state_dir / "ckpt", self.acc.unwrap_model(model), self.projections, optimizer,
                            self.state, self.adapters_only)  # fmt: skip
        self.acc.wait_for_everyone()
        self.state.checkpoint_s += time.perf_counter() - started

    def run(self) -> torch.nn.Module:
        cfg, acc = self.cfg, self.acc
        self.student.to(acc.device).train()
        self.projections.to(acc.device)
        params = [p for p in self.student.parameters() if p.requires_grad] + list(self.projections.parameters())
        # fused: one kernel for every parameter's update on CUDA (the foreach default launches several per step)
        fused = True if acc.device.type == "cuda" else None
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
        ckpt = self.state_dir / "ckpt"
        if loaded := load_checkpoint(ckpt, self.student, self.projections, optimizer, self.adapters_only):
            self.state = loaded
        model, optimizer = acc.prepare(self.student, optimizer)
        started, first_step = time.perf_counter() - self.state.elapsed_s, self.state.step
        tokens0, elapsed0 = self.state.tokens, self.state.elapsed_s
        self._fix_schedule(started, first_step)
        reason = "gate" if self.state.step == 0 and self._evaluate(model, None) else None  # the starting point
        timed = self.cfg.budget.minutes is not None  # only wall-clock stops can differ between ranks
        reported = 0.0
        while reason is None:
            reason = self._agree(self._stop_reason(started)) if timed else self._stop_reason(started)
            if reason is not None:
                break
            loss = self._step(model, optimizer, params)
            if self.state.total_steps is None:  # a minutes budget times its first steps: wait for each to finish
                float(loss)
            self.state.elapsed_s = time.perf_counter() - started
            self._fix_schedule(started, first_step)
            done = self.state.step
            evaluating, saving = done % cfg.eval_every == 0, done % cfg.checkpoint_every == 0
            if evaluating or self.state.elapsed_s - reported >= 1.0 or done == self.state.total_steps:
                reported = self.state.elapsed_s  # at most one host-device sync a second for the display
                rate = (self.state.tokens - tokens0) / max(1e-9, self.state.elapsed_s - elapsed0)
                self.on_progress({"step": done, "total": self.state.total_steps, "loss": float(loss),
                                  "tokens_per_s": rate, "tokens": self.state.tokens,
                                  "elapsed_s": self.state.elapsed_s})  # fmt: skip
            if evaluating and self._evaluate(model, float(loss)):
                reason = "gate"
            if saving or reason:
                self._checkpoint(model, optimizer)
        self.state.stopped_by = reason
        return acc.unwrap_model(model)
