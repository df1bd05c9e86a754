"""Data-parallel training over processes (``torch.distributed``; gloo on CPU, NCCL on GPU).

Launched with ``torchrun --nproc-per-node N``, each process (rank) holds a contiguous shard of the
spots and only the per-spot (local) parameters of those spots; the global parameters (m_g, s_eg,
detection hyper-parameters, the factorisation, ...) are replicated. Every step each rank computes
the loss of its own minibatch with the global sites' terms weighted 1 / N, and the likelihood and
local sites scaled by its shard size over its minibatch size, as a single process does for a
minibatch of the same total size. The global parameters' gradients are then summed over the ranks
(one all-reduce of a flat buffer, the loss riding along), so every rank takes the same step on them
as one process would with the union of the minibatches; local gradients stay where they are. The
ranks run the same number of steps per epoch (the total over the total batch size), so the
collectives line up.

With the same seed every rank draws the same noise for the global sites (as one process draws one),
and after the first broadcast the replicas stay bit-identical: they start equal and add the same
reduced gradients.
"""

from __future__ import annotations

import logging
import math
import os

import numpy as np
import torch

from ..io import InputError

logger = logging.getLogger(__name__)


class DataParallel:
    """This process's place in a data-parallel fit: its rank among ``world_size`` processes, and the
    collectives a fit needs. ``DataParallel()`` is the single process (every collective a no-op).

    Parameters
    ----------
    rank, world_size : int
        This process's index and the number of processes.
    local_rank : int
        Its index on this machine (the CUDA device it uses).
    """

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0):
        if not 0 <= int(rank) < int(world_size):
            raise InputError(f"rank {rank} is outside 0..{int(world_size) - 1}")
        self.rank, self.world_size, self.local_rank = int(rank), int(world_size), int(local_rank)

    @classmethod
    def from_env(cls, device: str = "auto") -> DataParallel:
        """The process group ``torchrun`` describes in the environment (``WORLD_SIZE``, ``RANK``,
        ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), joined now: gloo, or NCCL when the fit runs on
        CUDA. A single process when ``WORLD_SIZE`` is unset or 1."""
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world <= 1:
            return cls()
        import torch.distributed as dist

        local = int(os.environ.get("LOCAL_RANK", "0") or 0)
        if not dist.is_initialized():
            cuda = str(device) != "cpu" and torch.cuda.is_available()
            if cuda:
                torch.cuda.set_device(local)
            dist.init_process_group(backend="nccl" if cuda else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), local)

    @property
    def active(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes results."""
        return self.rank == 0

    def __repr__(self) -> str:
        return f"DataParallel(rank={self.rank}, world_size={self.world_size})"

    # ------------------------------------------------------------------ layout
    def shard(self, n_obs: int) -> slice:
        """This rank's spots: a contiguous block, ranks in order (sizes differ by at most one)."""
        if n_obs < self.world_size:
            raise InputError(f"{n_obs} spots cannot be shared by {self.world_size} processes; use fewer processes.")
        bounds = np.linspace(0, n_obs, self.world_size + 1).round().astype(int)
        return slice(int(bounds[self.rank]), int(bounds[self.rank + 1]))

    def epoch_steps(self, n_local: int, batch_size: int | None) -> int | None:
        """Steps of every rank in one epoch (each rank holding ``n_local`` spots; collective): all spots
        over the total ``batch_size``, or None for full-data steps."""
        (n_total,) = self.sum(n_local)
        n_total = int(n_total)
        if batch_size is None or int(batch_size) >= n_total:
            return None
        steps = math.ceil(n_total / int(batch_size))
        if steps > n_local:
            raise InputError(
                f"batch size {batch_size} over {n_total} spots makes {steps} steps per epoch, more than the "
                f"{n_local} spots of process {self.rank}; use a larger batch size."
            )
        return steps

    def device(self, device: torch.device) -> torch.device:
        """A CUDA device made this rank's own (``cuda:LOCAL_RANK``) when several processes train."""
        if self.active and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    # ------------------------------------------------------------------ collectives
    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place; returns it."""
        if self.active:
            import torch.distributed as dist

            dist.all_reduce(tensor)
        return tensor

    def sum(self, *values: float) -> tuple[float, ...]:
        """Python numbers summed over the ranks."""
        if not self.active:
            return tuple(float(v) for v in values)
        return tuple(self.sum_(torch.tensor(values, dtype=torch.float64, device=self._comm_device())).tolist())

    def broadcast_(self, tensors) -> None:
        """Overwrite ``tensors`` with rank 0's values, in place."""
        if not self.active:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for t in tensors:
                dist.broadcast(t.data, src=0)

    def reduce_gradients(self, params: list[torch.Tensor], loss: float) -> float:
        """Sum the gradients of ``params`` (the global parameters) and ``loss`` over the ranks, in one
        all-reduce; returns the summed loss (the whole step's)."""
        if not self.active:
            return float(loss)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads] + [torch.full((1,), float(loss), device=grads[0].device)])
        self.sum_(flat)
        offset = 0
        for p, g in zip(params, grads, strict=True):
            p.grad = flat[offset : offset + g.numel()].view_as(g)
            offset += g.numel()
        return float(flat[-1])

    def all_gather(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def gather(self, obj) -> list | None:
        """Every rank's ``obj`` (picklable), in rank order, on rank 0; None on the others."""
        out = self.all_gather(obj)
        return out if self.is_main else None

    def close(self) -> None:
        """Leave the process group (when this object joined one)."""
        if self.active:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def _comm_device(self) -> torch.device:
        import torch.distributed as dist

        return torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")


#: a single process
SINGLE = DataParallel()
