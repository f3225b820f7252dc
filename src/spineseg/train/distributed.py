"""Training on several processes with torchrun: one process per device, DistributedDataParallel.

``torchrun --standalone --nproc_per_node N $(which spineseg) train ...`` announces itself through
the environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``). `session` joins that process group for
the length of a command (NCCL when training on CUDA, each rank on ``cuda:LOCAL_RANK``; gloo on CPU)
and leaves it afterwards, also on errors. Without torchrun, or with one process, no process group
exists and every helper here is the identity: a plain ``spineseg train`` runs exactly as before.

What is whose:
- every rank trains on its own share of the slices (`data.dataset.make_loader` with ``shard``);
  gradients of the network and of the critic are averaged by DDP, so the weights stay identical;
- every rank validates a disjoint part of the validation slices; the per-slice Dice rows are
  gathered, so the score is that of one pass over the validation set, known to every rank;
- rank 0 alone writes (checkpoints, log.csv, tb/, config.json, splits.json, distributed.json).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import gc
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..models.checkpoint import pick_device

# in `spineseg experiment` rank 0 alone predicts and evaluates a test set while the others wait at a barrier
WAIT_TIMEOUT = datetime.timedelta(hours=6)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes; one process is rank 0 of 1."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, name: str = "auto") -> torch.device:
        """The device of ``--device``; under torchrun on CUDA, this rank's own GPU."""
        device = pick_device(name)
        if self.distributed and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast(self, value):
        """Rank 0's ``value``, on every rank."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value) -> list:
        """Every rank's ``value`` in rank order, on every rank."""
        if not self.distributed:
            return [value]
        out = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def shard(self, items: list) -> list:
        """This rank's disjoint part of ``items`` (every item on exactly one rank, none repeated)."""
        return items[self.rank::self.world_size]

    def wrap(self, module: torch.nn.Module, *example_inputs: torch.Tensor) -> torch.nn.Module:
        """``module`` under DistributedDataParallel (rank 0's weights broadcast, gradients averaged); on one
        process, ``module`` itself. ``example_inputs`` show which parameters a forward pass leaves unused."""
        if not self.distributed:
            return module
        device_ids = [module_device(module).index] if module_device(module).type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids,
                                       find_unused_parameters=has_unused_parameters(module, *example_inputs))


def module_device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def has_unused_parameters(module: torch.nn.Module, *example_inputs: torch.Tensor) -> bool:
    """Whether a training forward pass leaves a parameter without gradient (e.g. the critic's last norm,
    skipped on a 1 x 1 map at small inputs): DDP must then look for them each step, or it waits forever."""
    probe = copy.deepcopy(module).train()  # a copy: the probe must not touch the real one's norm statistics
    out = probe(*example_inputs)
    (out[0] if isinstance(out, (tuple, list)) else out).float().sum().backward()
    return any(p.requires_grad and p.grad is None for p in probe.parameters())


def rank_seed(seed: int, rank: int, epoch: int) -> int:
    """A seed of its own for each (run seed, rank, epoch), for the randomness that must differ between ranks."""
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0])


def current() -> Ranks:
    """This process's ranks: from the process group `session` joined, else one process."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size(),
                     str(dist.get_backend()))
    return Ranks()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def session(device: str = "auto"):
    """Join torchrun's process group for the block and yield this process's `Ranks`; tear it down afterwards,
    also on errors. Without torchrun (or with one process), yield one process and start nothing."""
    if not launched_by_torchrun() or dist.is_initialized():
        yield current()
        return
    on_cuda = pick_device(device).type == "cuda"
    if on_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if on_cuda else "gloo", timeout=WAIT_TIMEOUT)
    try:
        ranks = current()
        yield ranks
        ranks.barrier()  # leave together: a rank gone early would break a peer's last collective
    finally:
        # DDP wrappers caught in reference cycles would otherwise outlive the group and be torn down with the
        # interpreter; free them while the group and the interpreter are whole (a rank aborted at exit with
        # "terminate called without an active exception" once; not reproduced in 14 reruns, under load or idle)
        gc.collect()
        dist.destroy_process_group()
