"""Data-parallel training under torchrun, on torch.distributed's own engine.

    torchrun --nproc_per_node=N -m lutcompile model.onnx --calib c.npz --train t.npz -o out.onnx

torchrun sets RANK, WORLD_SIZE and MASTER_ADDR/PORT in each process's environment. Every rank
runs the same deterministic calibrate and fit; the train stage wraps the torch program in
DistributedDataParallel (gloo on CPU, NCCL where CUDA is present, the same code), so its
parameters, broadcast from rank 0 at the start, stay identical on every rank; each rank
trains on its own shard of the training rows, and all ranks evaluate the same held-out
slice, so they keep the same epoch. Rank 0 alone shows progress and writes the model and
the report. Without torchrun's environment, world() is a single rank and nothing here runs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def writes(self) -> bool:
        """Whether this rank writes files and shows progress (rank 0 only)."""
        return self.rank == 0

    def shard(self, rows: np.ndarray) -> np.ndarray:
        """This rank's share of `rows`: every size-th row from its rank, every share cut to the
        shortest, so that every rank takes the same number of steps (DDP needs it)."""
        if not self.distributed:
            return rows
        share = len(rows) // self.size
        return rows[self.rank::self.size][:share]


def world() -> World:
    """The process group torchrun describes in the environment, joined on first use."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return World(dist.get_rank(), dist.get_world_size())


def data_parallel(module: torch.nn.Module, group: World) -> torch.nn.Module:
    """`module` wrapped for data-parallel training when there are several ranks, else itself."""
    if not group.distributed:
        return module
    return torch.nn.parallel.DistributedDataParallel(module)
