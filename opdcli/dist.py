"""Rank, world size, sharding and reductions over torch.distributed (no-ops on one process).

`opd train` under `torchrun --nproc_per_node N` reads RANK / WORLD_SIZE / LOCAL_RANK from the
environment (torchrun's own rendezvous, multi-node included), joins the process group (gloo
on CPU, NCCL on CUDA, or `dist.backend`) and places each rank on `cuda:LOCAL_RANK`. Alone, every
helper here returns its input.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from opdcli.errors import ConfigError


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, total: int) -> tuple[int, int]:
        """Rows [start, stop) of `total` that this rank owns (contiguous; equal when world divides total)."""
        return total * self.rank // self.world, total * (self.rank + 1) // self.world

    def _reduce(self, value, dtype: torch.dtype, op):
        t = torch.tensor([value], dtype=dtype, device=self._device())
        tdist.all_reduce(t, op=op)
        return t.item()

    def sum(self, value: float) -> float:
        """Sum of a float over ranks (in float64)."""
        return float(self._reduce(value, torch.float64, tdist.ReduceOp.SUM)) if self.active else value

    def max(self, value: int) -> int:
        """Largest integer over ranks."""
        return int(self._reduce(value, torch.long, tdist.ReduceOp.MAX)) if self.active else value

    def fmax(self, value: float) -> float:
        """Largest float over ranks."""
        return float(self._reduce(value, torch.float64, tdist.ReduceOp.MAX)) if self.active else value

    def sums(self, values: dict[str, float]) -> dict[str, float]:
        """Sum each value over ranks in one collective (same keys on every rank)."""
        if not self.active or not values:
            return dict(values)
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self._device())
        tdist.all_reduce(t)
        return dict(zip(keys, t.tolist(), strict=True))

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-shaped per-rank tensors along dim 0, in rank order."""
        if not self.active:
            return x
        dev = self._device()
        parts = [torch.empty_like(x, device=dev) for _ in range(self.world)]
        tdist.all_gather(parts, x.contiguous().to(dev))
        return torch.cat(parts, 0).to(x.device)

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()

    def _device(self) -> torch.device:
        if tdist.get_backend() == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


ALONE = Dist()


def from_env() -> Dist:
    """The job layout torchrun set (rank 0 of 1 without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return ALONE
    return Dist(rank=int(os.environ["RANK"]), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def init(run_device: str, backend: str = "auto") -> Dist:
    """Join the process group torchrun describes; return this rank's Dist.

    Args:
        run_device: run.device (auto, cpu, cuda, cuda:N); under torchrun a CUDA device is
            always cuda:LOCAL_RANK.
        backend: auto (nccl on CUDA, gloo on CPU), gloo or nccl.
    """
    d = from_env()
    if not d.active:
        return d
    cuda = run_device.startswith("cuda") or (run_device == "auto" and torch.cuda.is_available())
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if backend == "nccl" and not cuda:
        raise ConfigError("dist.backend=nccl needs CUDA devices; set run.device=cuda or dist.backend=gloo")
    if cuda:
        torch.cuda.set_device(d.local_rank)
    if not tdist.is_initialized():
        tdist.init_process_group(backend=backend)
    return d


def device_for(run_device: str, d: Dist) -> str:
    """run.device as this rank sees it: cuda:LOCAL_RANK under torchrun."""
    if not d.active:
        return run_device
    if run_device == "auto":
        return f"cuda:{d.local_rank}" if torch.cuda.is_available() else "cpu"
    if run_device.startswith("cuda"):
        if run_device not in ("cuda", f"cuda:{d.local_rank}"):
            raise ConfigError(f"run.device is '{run_device}' but under torchrun rank {d.rank} runs on "
                              f"cuda:{d.local_rank}; set run.device=cuda (or auto)")
        return f"cuda:{d.local_rank}"
    return run_device


def shutdown(d: Dist) -> None:
    if d.active and tdist.is_initialized():
        tdist.destroy_process_group()
