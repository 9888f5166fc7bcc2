"""Stage B: train the view-conditioned decoder from the cache, with periodic end-to-end steps.

`train(config)` prepares everything that needs no GPU (`pipeline.train.setup.prepare`), then
runs `train_process` (`pipeline.train.loop`) once per process: in this process, in processes it
spawns for `--gpus 0,1` / `--device cpu --workers N` (DDP over NCCL or gloo), or per torchrun
rank.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from multiprocessing.connection import wait
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.config import TrainConfig
from pipeline.distributed import (
    DistributedContext,
    WorkerError,
    die_with_parent,
    free_port,
    spawned_group_env,
)
from pipeline.train.cache_choice import from_cache
from pipeline.train.loop import train_process
from pipeline.train.setup import Prepared, prepare, requested_fields, resume_config


def train(config: TrainConfig, given: dict | None = None) -> Path:
    """Run Stage B; returns the run directory. With `config.resume`, `given` holds the flags
    the user set (default: every field that differs from TrainConfig's defaults)."""
    if config.cache and not config.resume:
        config = from_cache(config, requested_fields(config) if given is None else given)
    if config.resume:
        config = resume_config(config.resume, requested_fields(config) if given is None
                               else given)
    if "WORLD_SIZE" in os.environ:  # torchrun: one process per device, across machines
        context = DistributedContext.from_env(backend=_backend(config))
        if context.is_leader:
            print("config:", asdict(config), flush=True)
        prepared = prepare(config, context)
        train_process(prepared, context)
        return prepared.run_dir
    print("config:", asdict(config), flush=True)
    prepared = prepare(config)
    if config.world_size == 1:
        train_process(prepared, DistributedContext(local_rank=_gpu(config, 0)))
    else:
        _spawn(prepared)
    return prepared.run_dir


def _gpu(config: TrainConfig, rank: int) -> int:
    """The CUDA index of local process `rank` (`--gpus 2,3`: rank 0 uses GPU 2)."""
    return config.gpus[rank] if config.device == "cuda" else rank


def _backend(config: TrainConfig) -> str:
    return "nccl" if config.device == "cuda" else "gloo"


def _spawn(prepared: Prepared) -> None:
    ctx, port = mp.get_context("spawn"), free_port()
    world = prepared.config.world_size
    processes = [ctx.Process(target=_spawned_main, args=(prepared, rank, world, port, os.getpid()))
                 for rank in range(world)]
    for process in processes:
        process.start()
    running, failed = list(processes), None
    while running and failed is None:  # the first failure stops the others at once
        wait([p.sentinel for p in running])
        for process in [p for p in running if not p.is_alive()]:
            running.remove(process)
            if process.exitcode != 0:
                failed = process.exitcode
    for process in running:
        process.terminate()
        process.join()
    if failed is not None:
        raise WorkerError(f"a training process exited with code {failed} (its error is above)")


def _spawned_main(prepared: Prepared, rank: int, world: int, port: int, parent: int) -> None:
    die_with_parent(parent)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    with spawned_group_env(rank, world, port, local_rank=_gpu(prepared.config, rank)):
        context = DistributedContext.from_env(backend=_backend(prepared.config))
        try:
            train_process(prepared, context)
        finally:
            dist.destroy_process_group()
