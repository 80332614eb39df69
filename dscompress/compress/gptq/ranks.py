"""How the processes of a multi-device pass exchange Hessians and results: `SingleRank` (one process, every call a
no-op) or `Ranks` (torch.distributed: NCCL on GPUs, gloo on CPU). Tensors passed in live on the rank's device."""

from __future__ import annotations

import torch

from dscompress.compress.gptq.math import HessianAccumulator


class SingleRank:
    """One process: nothing to exchange."""

    rank, world = 0, 1

    def reduce(self, acc: HessianAccumulator) -> HessianAccumulator:
        return acc

    def broadcast(self, tensors: list[torch.Tensor], src: int) -> None:
        pass

    def agree(self, flag: bool) -> bool:
        return flag

    def max(self, value: int) -> int:
        return value

    def slices(self, n: int) -> list[tuple[int, int]]:
        """Row ranges [lo, hi) of n rows, one per rank, as equal as possible."""
        assert n >= self.world, f"{n} rows cannot be split over {self.world} ranks"
        return [(n * r // self.world, n * (r + 1) // self.world) for r in range(self.world)]


class Ranks(SingleRank):
    """Several processes under an initialised torch.distributed process group."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def reduce(self, acc: HessianAccumulator) -> HessianAccumulator:
        """Every rank's running-mean Hessian becomes the mean over all ranks' tokens (weighted by counts)."""
        n = torch.tensor([float(acc.n)], device=acc.H.device, dtype=torch.float64)
        self.dist.all_reduce(n)
        acc.H.mul_(acc.n)
        self.dist.all_reduce(acc.H)
        acc.n = int(n.item())
        if acc.n:
            acc.H.div_(acc.n)
        return acc

    def broadcast(self, tensors: list[torch.Tensor], src: int) -> None:
        for t in tensors:
            if t.numel():
                self.dist.broadcast(t, src)

    def agree(self, flag: bool) -> bool:
        """Rank 0's answer, on every rank (e.g. whether a resume file exists)."""
        device = "cuda" if self.dist.get_backend() == "nccl" else "cpu"
        value = torch.tensor([float(flag)], device=device)
        self.dist.broadcast(value, 0)
        return bool(value.item())

    def max(self, value: int) -> int:
        device = "cuda" if self.dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([float(value)], device=device, dtype=torch.float64)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return int(t.item())
