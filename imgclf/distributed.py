"""Training in several processes: DistributedDataParallel under ``torchrun``.

``train.processes`` > 1 makes the train stage start itself again under ``torchrun``, one
worker per process; each worker takes an equal share of every global batch and DDP averages
the gradients, so the optimisation follows the global batch size whatever the number of
processes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from .files import PipelineError

log = logging.getLogger(__name__)


@dataclass
class Distributed:
    """This process's place among the ``torchrun`` workers (a single process: world 1)."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1
    local_world: int = 1

    @classmethod
    def from_env(cls) -> "Distributed":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        import torch.distributed as td

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if not td.is_initialized():
            td.init_process_group(backend)
        return cls(rank=td.get_rank(), local_rank=int(os.environ.get("LOCAL_RANK", "0")), world=world,
                   local_world=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        if self.world > 1 and device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        return device

    def cpu_threads_per_process(self, device: torch.device) -> int:
        """0 (= all cores) for one process; on CPU, the cores shared among the local workers."""
        if self.world == 1 or device.type != "cpu":
            return 0
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(1, cores // self.local_world)

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def _reduce(self, x: torch.Tensor, average: bool) -> torch.Tensor:
        if self.world == 1:
            return x
        import torch.distributed as td

        x = x.clone()
        td.all_reduce(x)
        return x / self.world if average else x

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        return self._reduce(x, average=True)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        return self._reduce(x, average=False)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as td

            td.barrier()

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as td

            td.destroy_process_group()


def launch_processes(processes: int, script: str) -> None:
    """Run ``script`` under torchrun as ``processes`` workers on this machine (DDP)."""
    from torch.distributed.run import main as torchrun

    log.info("starting %d training processes with torchrun", processes)
    try:
        torchrun(["--standalone", f"--nproc_per_node={processes}", script])
    except Exception as e:  # torchrun's ChildFailedError: the worker already printed why
        raise PipelineError(f"a training process failed ({type(e).__name__}); its message is above") from None
