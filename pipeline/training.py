"""Stage B: train the view-conditioned decoder from the cache, with periodic end-to-end epochs.

`train(config)` prepares everything that needs no GPU (manifest check, cache lookup, run
directory), then runs `train_process` once per process: in this process, in processes it spawns
for `--gpus 0,1` / `--device cpu --workers N` (DDP over NCCL or gloo), or per torchrun rank.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, replace
from multiprocessing.connection import wait
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.augment import VERSION, extraction_jobs
from pipeline.cache import FeatureCache, cache_path
from pipeline.checks import check_manifest
from pipeline.config import TrainConfig
from pipeline.datasets import ViewVocabulary, split_samples
from pipeline.distributed import DistributedContext, die_with_parent, free_port, spawned_group_env
from pipeline.extraction import cache_signature, run_extraction
from pipeline.manifest import Sample, resolve_data
from pipeline.reporting import write_json


class MissingFeaturesError(RuntimeError):
    """The cache of this model, adapter and preprocessing lacks images of the manifest."""


@dataclass
class Prepared:
    """What every training process needs, computed once before any GPU work."""

    config: TrainConfig
    run_dir: Path
    train: list[Sample]
    val: list[Sample]
    train_keys: list[str]
    val_keys: list[str]
    views: ViewVocabulary
    cache: Path
    signature: dict


def default_run_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def ensure_cache(config: TrainConfig, keys: list[str], samples: list[Sample],
                 adapter: str | None = None) -> tuple[Path, dict]:
    """The cache holding every key's features for `config` (and `adapter`), extracting if asked."""
    extract = config.extract_config(adapter=adapter)
    signature = cache_signature(extract)
    path = cache_path(config.cache_dir, signature).resolve()  # runs may move; the cache does not
    cache = FeatureCache.find(config.cache_dir, signature)
    wanted = list(extraction_jobs(samples, keys, config.copy_plan))
    missing = len(wanted) if cache is None else int(
        sum(1 for r, d in _rows_done(cache, wanted) if r < 0 or not d))
    if missing and config.extract_missing:
        run_extraction(extract, samples, keys)
    elif missing:
        command = _extract_command(extract)
        state = "does not exist" if cache is None else f"lacks {missing} of {len(wanted)} images"
        raise MissingFeaturesError(
            f"the feature cache {path} {state}. Extract them first:\n  {command}\n"
            "or rerun with --extract-missing.")
    return path, signature


def _rows_done(cache: FeatureCache, keys: list[str]):
    rows, done = cache.rows_for(keys), cache.done()
    return [(int(r), bool(done[r]) if r >= 0 else False) for r in rows]


def _extract_command(extract) -> str:
    parts = ["python extract_features.py", f"--data {extract.data}",
             f"--backbone {extract.backbone}"]
    for flag, value in (("checkpoint", extract.checkpoint), ("adapter", extract.adapter)):
        if value:
            parts.append(f"--{flag} {value}")
    parts += [f"--levels {','.join(extract.levels)}", f"--amp {extract.amp}",
              f"--cache-dir {extract.cache_dir}"]
    if extract.augment_copies:
        parts.append(f"--augment-copies {extract.augment_copies}")
        if extract.augment != "random":
            parts.append(f"--augment {extract.augment}")
        if extract.augment_seed:
            parts.append(f"--augment-seed {extract.augment_seed}")
    if extract.device == "cpu":
        parts.append("--device cpu")
    return " ".join(parts)


def prepare(config: TrainConfig, context: DistributedContext | None = None) -> Prepared:
    """Check the manifest, find the cache and create the run directory (no GPU work).

    Under torchrun every rank calls this (extraction, if needed, is shared); rank 0 writes.
    """
    context = context or DistributedContext()
    samples = resolve_data(config.data, config.cache_dir)
    report = check_manifest(samples, require_masks=True)
    if report.warnings and context.is_leader:
        print(report.format(), flush=True)
    report.raise_if_errors()
    key_of = dict(zip(samples, report.keys, strict=True))
    train, val = split_samples(samples)
    views = ViewVocabulary.from_samples(train)
    if context.is_leader:
        views.warn_unseen(val, "validation")
    cache, signature = ensure_cache(config, report.keys, samples)
    run_dir = [str(Path(config.run_dir) if config.run_dir else default_run_dir())]
    if context.distributed:
        dist.broadcast_object_list(run_dir, src=0)  # ranks may disagree on the timestamp
    run_dir = Path(run_dir[0])
    config = replace(config, run_dir=str(run_dir))
    if context.is_leader:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not config.resume:
            write_json(run_dir / "config.json", {
                "config": asdict(config), "cache": {"id": cache.stem, "path": str(cache),
                                                    "signature": signature},
                "views": list(views.labels), "samples": {"train": len(train), "val": len(val)},
                "augment_version": VERSION,
            })
    context.barrier()
    return Prepared(config, run_dir, train, val, [key_of[s] for s in train],
                    [key_of[s] for s in val], views, cache, signature)


def train(config: TrainConfig) -> Path:
    """Run Stage B; returns the run directory."""
    from pipeline.trainer import train_process

    if config.resume:
        config = resume_config(config.resume)
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


def resume_config(run_dir: str | Path) -> TrainConfig:
    """The saved configuration of a run, to continue it."""
    import json

    saved = json.loads((Path(run_dir) / "config.json").read_text())["config"]
    for name in ("levels", "gpus"):
        saved[name] = tuple(saved[name])
    saved.update(resume=str(run_dir), run_dir=str(run_dir))
    return TrainConfig(**saved)


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
        raise RuntimeError(f"a training process exited with code {failed}")


def _spawned_main(prepared: Prepared, rank: int, world: int, port: int, parent: int) -> None:
    die_with_parent(parent)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    with spawned_group_env(rank, world, port, local_rank=_gpu(prepared.config, rank)):
        context = DistributedContext.from_env(backend=_backend(prepared.config))
        from pipeline.trainer import train_process

        try:
            train_process(prepared, context)
        finally:
            dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
