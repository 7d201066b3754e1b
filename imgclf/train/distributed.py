"""This process's place among the training processes (torchrun workers), and the collectives
training needs: a process group on the right backend, the DDP wrap with synchronised batch
norm, and sharing a checkpoint or checking agreement across nodes.

How the processes are started (torchrun's command line, the rendezvous) is ``launch.py``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import PipelineError
from . import sync_batchnorm
from .launch import FIRST_NODE_ENV, STARTED_ENV

log = logging.getLogger(__name__)

def backend_for(device: torch.device) -> str:
    """NCCL moves CUDA tensors only; gloo serves the CPU (also on a host that has CUDA)."""
    return "nccl" if device.type == "cuda" else "gloo"


@dataclass
class Distributed:
    """This process's place among the ``torchrun`` workers (a single process: world 1)."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1
    local_world: int = 1
    nodes: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str = ""

    @classmethod
    def from_env(cls, device: torch.device, timeout: float = 300) -> "Distributed":
        """Join the process group torchrun's environment describes, on the backend of
        ``device`` (the resolved training device); ``timeout``: seconds a collective waits."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls(device=device)
        import torch.distributed as td

        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        _die_with_agent()
        backend = backend_for(device)
        if not td.is_initialized():
            store, rank = _first_node_first(os.environ, world, timeout)
            td.init_process_group(backend, store=store, rank=rank, world_size=world,
                                  timeout=timedelta(seconds=timeout))
        rank = td.get_rank()
        if os.environ.get(STARTED_ENV):
            Path(os.environ[STARTED_ENV]).touch()
        # Only rank 0 reports progress (cli.run_stage decided by torchrun's rank, before the remap).
        logging.getLogger().setLevel(logging.INFO if rank == 0 else logging.WARNING)
        if rank == 0 and os.environ.get("RANK") != "0":
            log.info("torchrun numbered this node %s; its processes take the first ranks instead, so that "
                     "rank 0, which writes, runs on the first node", os.environ.get("GROUP_RANK"))
        return cls(rank=rank, local_rank=local_rank, world=world, local_world=local_world,
                   nodes=max(1, world // local_world), device=device, backend=backend)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def cpu_threads_per_process(self) -> int:
        """0 (= all cores) for one process; on CPU, the cores shared among the local workers."""
        if self.world == 1 or self.device.type != "cpu":
            return 0
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(1, cores // self.local_world)

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` for training: with several processes, batch norm synchronised over the
        global batch (the same Parameter objects, so the optimiser stays valid) inside DDP."""
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        sync_batchnorm.convert(model, self.device)
        # Synchronised statistics leave every process with the same running stats: no need for
        # DDP to broadcast the buffers from rank 0 before every forward.
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                       forward_sync_buffers=False)

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

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (any picklable object) on every process."""
        if self.world == 1:
            return obj
        import torch.distributed as td

        box = [obj]
        td.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order, on every process."""
        if self.world == 1:
            return [obj]
        import torch.distributed as td

        out: list[Any] = [None] * self.world
        td.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as td

            td.barrier()

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as td

            td.destroy_process_group()


def _first_node_first(env: Mapping[str, str], world: int, timeout: float) -> tuple[Any, int]:
    """The store for the process group, and this process's rank in it: the first node's
    processes come first, so its local rank 0 is global rank 0, the one that writes.

    torchrun's c10d rendezvous numbers the nodes by sorting their descriptors (address, pid),
    so the first node may come anywhere. Each process publishes whether it runs on the first
    node through the store torchrun's agent hosts at MASTER_ADDR:MASTER_PORT; the ranks are
    then rotated (a node's ranks stay contiguous, in local-rank order).
    """
    import torch.distributed as td

    rank = int(env["RANK"])
    node = env.get("GROUP_RANK", "0")
    first = env.get(FIRST_NODE_ENV) or ("1" if node == "0" else "0")  # torchrun started by hand
    # The agent hosts the store (TORCHELASTIC_USE_AGENT_STORE), or rank 0 does.
    host_store = env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and rank == 0
    base = td.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world, host_store,
                       timeout=timedelta(seconds=timeout))
    # A fresh namespace per restart of the workers, as torch's own env:// initialisation does.
    store = td.PrefixStore(f"/imgclf/attempt_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}/", base)
    store.set(f"first_node/{rank}", f"{first} {node}")
    flags = [store.get(f"first_node/{r}").decode().split() for r in range(world)]
    first_nodes = sorted({n for f, n in flags if f == "1"})
    if len(first_nodes) != 1:
        raise PipelineError(
            f"{len(first_nodes) or 'none'} of the {len({n for _, n in flags})} nodes of this run "
            f"{'was' if len(first_nodes) < 2 else 'were'} started as the first node: start exactly one with "
            "`dvc repro` (or `dvc exp run`) and the others with `python stages/train.py --join`"
        )
    first_rank = min(r for r, (f, _) in enumerate(flags) if f == "1")
    return td.PrefixStore("pg/", store), (rank - first_rank) % world


def _die_with_agent() -> None:
    """Ask the kernel to kill this worker when its torchrun agent dies.

    torchrun starts each worker in a session of its own, so a node's agent killed outright
    (kill -9, a batch system reclaiming the node) would leave its workers training on as
    orphans, and the other nodes would never learn that the node is gone.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the agent died before the call above
        os._exit(1)


def is_lost_peer(e: BaseException) -> bool:
    """Whether ``e`` is a collective failing because another process is gone or silent."""
    import torch.distributed as td

    if isinstance(e, td.DistError):
        return True
    return isinstance(e, RuntimeError) and bool(re.search(r"gloo|nccl|connection|timed out", str(e), re.I))


def lost_peer_error(e: BaseException, timeout: float, checkpoint: os.PathLike | str) -> PipelineError:
    """One line for a run that lost one of its processes: what happened, what is kept, what to do."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    cause = re.sub(r"^\[[^\]]*\]\s*", "", first)  # gloo prefixes its source file and line
    cause = cause.split(". ")[0].rstrip(".")
    return PipelineError(
        f"another training process was lost ({cause}): a node stopped, crashed or was unreachable for "
        f"train.dist_timeout = {timeout:g} s. The first node keeps {checkpoint}, the last finished "
        "epoch: start the run again on every node to resume from it"
    )
