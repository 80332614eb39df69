"""GPTAQ, GPTQ with asymmetric calibration (Li et al., ICML 2025, arXiv 2504.02692): each weight is fitted so the
quantized model's layer, on the inputs the quantized model gives it (X~), reproduces what the float model's layer
computes on the float model's inputs (X), instead of its own float output on X~ (plain GPTQ). The error that the
layers before it made is then corrected, not carried along.

Rows are tokens. GPTQ minimises ||X~ Q^T - X~ W^T||^2; GPTAQ minimises ||X~ Q^T - X W^T||^2. Writing X = X~ + dX,
the second equals ||X~ (Q - W*)^T||^2 plus a constant, with the least-squares target

    W* = W + W D H^-1,   D = dX^T X~,   H = X~^T X~          (both as running means of 2/n, like the Hessian)

so GPTAQ is GPTQ's own solve (the same Hessian, grids, act-order and kernels) on the shifted weights W*. H is
dampened as the solve dampens it, so with dX = 0 the shift is 0. `gptaq` scales the shift (W + a W D H^-1): the
reference implementation applies the same correction column by column inside the solve and scales it by 0.25;
here a = 1 is the exact least-squares target and smaller values trust the calibration less.
Our own code (the algorithm is the product); the reference is the authors' repository.
"""

from __future__ import annotations

import copy

import torch

from dscompress.compress.layerwise import StopForward, run_layer


class CrossAccumulator:
    """Running mean of 2 dX^T X~ over tokens, float32 (the same normalisation as HessianAccumulator's H)."""

    def __init__(self, in_features: int, device):
        self.D = torch.zeros(in_features, in_features, device=device, dtype=torch.float32)
        self.n = 0

    def copy(self) -> CrossAccumulator:
        twin = CrossAccumulator.__new__(CrossAccumulator)
        twin.D, twin.n = self.D.clone(), self.n
        return twin

    def add(self, x_float: torch.Tensor, x_quant: torch.Tensor) -> None:
        xq = x_quant.reshape(-1, x_quant.shape[-1]).float()
        dx = x_float.reshape(-1, x_float.shape[-1]).float() - xq
        m = xq.shape[0]
        if m == 0:
            return
        keep = self.n / (self.n + m)
        self.n += m
        self.D.addmm_(dx.t(), xq, beta=keep, alpha=2.0 / self.n)


def shift_target(W: torch.Tensor, H: torch.Tensor, cross: CrossAccumulator, damp_frac: float, alpha: float
                 ) -> torch.Tensor:  # fmt: skip
    """W + alpha W D (H + damp I)^-1 for W (out, in) (stack the weights that share H: one factorization), in
    float32; dead inputs (diag H = 0) are left as they are. H is not modified; the accumulator's D is consumed
    (freed once W D exists, so at most three (in, in) matrices live at once: H, its dampened copy, its factor).
    Falls back to W (no shift) when the dampened H is not positive definite."""
    W32 = W.float()
    WD, cross.D = W32 @ cross.D, None
    dead = H.diagonal() == 0
    WD[:, dead] = 0.0
    damped = H.clone()
    damped[dead, dead] = 1.0
    damped.diagonal().add_(damp_frac * float(damped.diagonal().mean()))
    L, info = torch.linalg.cholesky_ex(damped)
    del damped
    if int(info) != 0:
        return W32
    return W32 + alpha * torch.cholesky_solve(WD.t().contiguous(), L).t()


class FloatTwin:
    """The float model's side: what the float model feeds the current decoder block, and a float copy of that
    block taken before it is quantized. `inputs` gives the float inputs of one of its Linears, batch by batch."""

    def __init__(self, batches: list[tuple]):
        self.batches = [(hidden.clone(), kwargs) for hidden, kwargs in batches]  # block 0's inputs are the same
        self.layer = None
        self.names: dict[int, str] = {}

    def start(self, layer: torch.nn.Module) -> None:
        self.layer = copy.deepcopy(layer)
        self.names = {id(m): n for n, m in layer.named_modules()}

    def inputs(self, module: torch.nn.Module, index: int) -> torch.Tensor:
        """What the float block's copy of `module` (a module of the block being quantized) reads on batch `index`."""
        return capture_input(self.layer, self.layer.get_submodule(self.names[id(module)]), self.batches[index])

    def advance(self) -> None:
        """The float block's outputs become the next block's float inputs."""
        outs = run_layer(self.layer, self.batches)
        self.batches = [(out, kwargs) for out, (_, kwargs) in zip(outs, self.batches, strict=True)]
        self.layer, self.names = None, {}


def capture_input(layer, module, batch: tuple) -> torch.Tensor:
    """`module`'s input when `layer` runs on one batch (the layer stops there)."""
    seen = []

    def hook(_, args):
        seen.append(args[0])
        raise StopForward

    handle = module.register_forward_pre_hook(hook)
    try:
        run_layer(layer, [batch])
    finally:
        handle.remove()
    return seen[0]
