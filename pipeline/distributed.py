"""Processes across GPUs and machines: torchrun's environment, or workers this run spawns.

Under `torchrun` (RANK and WORLD_SIZE set) every rank is one process with one device; without it,
`--gpus 0,1` or `--device cpu --workers N` spawn one process per device through the same code.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.errors import UserError


class WorkerError(UserError, RuntimeError):
    """A worker process this run spawned failed; the message is the worker's own, or its exit
    code when it died without one."""


def die_with_parent(parent_pid: int | None = None) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux), so a killed run leaves
    no orphan writing into the cache after the lock is gone. With `parent_pid`, also exit at once
    if the parent already died while this process was starting."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class DistributedContext:
    """This process's place among the run's processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, backend: str | None = None) -> DistributedContext:
        """Join torchrun's (or a spawned) process group when WORLD_SIZE > 1."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if not dist.is_initialized():
            backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
            if backend == "nccl":  # collectives before training must run on this rank's GPU
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(backend=backend)
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def leader_lock(self, make_lock):
        """The leader holds `make_lock()` for the whole block; other ranks hold nothing."""
        return make_lock() if self.is_leader else nullcontext()

    def local_device(self) -> str:
        return f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"


@contextmanager
def spawned_group_env(rank: int, world_size: int, port: int, local_rank: int | None = None):
    """Set the variables torchrun would set, for a process this run spawned itself."""
    local = rank if local_rank is None else local_rank
    values = {"RANK": str(rank), "WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(port), "LOCAL_RANK": str(local)}
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
