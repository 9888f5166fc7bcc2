"""Stage B: train the view-conditioned decoder from the cache, with periodic end-to-end steps.

`train(config)` prepares everything that needs no GPU (`pipeline.train.setup.prepare`), then
runs `train_process` (`pipeline.train.loop`) once per process: in this process, in processes it
spawns for `--gpus 0,1` / `--device cpu --workers N` (DDP over NCCL or gloo), or per torchrun
rank.
"""

from __future__ import annotations

import os
from multiprocessing.connection import wait
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.config import TrainConfig, describe
from pipeline.distributed import (
    DistributedContext,
    WorkerError,
    die_with_parent,
    free_port,
    spawned_group_env,
)
from pipeline.errors import Terminated, terminate_like_interrupt
from pipeline.train.cache_choice import from_cache
from pipeline.train.checkpoint import saved_state
from pipeline.train.loop import train_process
from pipeline.train.reporting import MetricsLog, plot_curves, write_json
from pipeline.train.scoring import scoring_note
from pipeline.train.setup import Prepared, prepare, requested_fields, resume_config

INTERRUPT_GRACE_S = 20
"""How long spawned workers get to write their report after Ctrl-C or SIGTERM (Slurm waits
KillWait, 30 s by default, before SIGKILL)."""


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
            print(describe(config), flush=True)
        prepared = prepare(config, context)
        _train_process(prepared, context)
        return prepared.run_dir
    print(describe(config), flush=True)
    prepared = prepare(config)
    if config.world_size == 1:
        _train_process(prepared, DistributedContext(local_rank=_gpu(config, 0)))
    else:
        _spawn(prepared)
    return prepared.run_dir


def _train_process(prepared: Prepared, context: DistributedContext) -> None:
    """`train_process`; stopped by Ctrl-C or SIGTERM, the leader first writes the report of the
    best validation so far (`_report_interrupted`)."""
    try:
        train_process(prepared, context)
    except KeyboardInterrupt as stop:
        if context.is_leader:
            _report_interrupted(prepared, "SIGTERM" if isinstance(stop, Terminated)
                                else "SIGINT")
        raise


def _report_interrupted(prepared: Prepared, by: str) -> None:
    """report.json (best validation so far, marked `interrupted`, so `runs compare` does not
    call the run finished) and curves.png, from last.pt and metrics.jsonl: a second or two,
    within any scheduler's grace period. Nothing when no step was validated yet."""
    run_dir = prepared.run_dir
    if not (run_dir / "last.pt").is_file():
        return
    state, total = saved_state(run_dir / "last.pt"), prepared.config.total_steps(
        len(prepared.train))
    write_json(run_dir / "report.json", {
        "val": state["best"]["val"], "scoring": scoring_note(prepared.val),
        "interrupted": {"by": by, "step": state["step"], "of": total,
                        "resume": f"sam3-vessel train --resume {run_dir}"}})
    plot_curves(MetricsLog(run_dir / "metrics.jsonl").read(), run_dir / "curves.png")


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
    try:
        while running and failed is None:  # the first failure stops the others at once
            wait([p.sentinel for p in running])
            for process in [p for p in running if not p.is_alive()]:
                running.remove(process)
                if process.exitcode != 0:
                    failed = process.exitcode
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the workers stop as they would alone
        for process in running:
            process.terminate()
        for process in running:
            process.join(INTERRUPT_GRACE_S)
        raise
    for process in running:
        process.terminate()
        process.join()
    if failed is not None:
        raise WorkerError(f"a training process exited with code {failed} (its error is above)")


def _spawned_main(prepared: Prepared, rank: int, world: int, port: int, parent: int) -> None:
    die_with_parent(parent)
    # The parent stops its workers with SIGTERM, so they obey it even where the parent was
    # started with SIGTERM ignored; rank 0 then writes the report.
    terminate_like_interrupt(force=True)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    with spawned_group_env(rank, world, port, local_rank=_gpu(prepared.config, rank)):
        context = DistributedContext.from_env(backend=_backend(prepared.config))
        try:
            _train_process(prepared, context)
        finally:
            dist.destroy_process_group()
