"""Stage A: run SAM 3's image backbone over a manifest and fill the feature cache.

One writer run per cache (an flock) prepares the cache: new image keys get rows, and the rows
not yet `done` are split between worker processes, one per listed GPU (or `--workers` CPU
processes), or between torchrun ranks. Each worker decodes in DataLoader processes, runs the
backbone under autocast (`image_features`: SAM 3's `forward_image`, computing only the cached
levels; with `--cache-block K` only the trunk up to block K, whose tokens are stored) and hands
finished samples to writer threads, so writing overlaps the next batch's forward. A sample is
marked done only after its chunks are on disk.
"""

from __future__ import annotations

import errno
import os
import queue
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline.cache.signature import build_signature
from pipeline.cache.store import FeatureCache, cache_path, writer_lock
from pipeline.config import ExtractConfig
from pipeline.data.augment import extraction_jobs, transform_image
from pipeline.data.images import normalize, read_image, sam3_resize
from pipeline.data.manifest import Sample
from pipeline.distributed import DistributedContext, WorkerError, die_with_parent
from pipeline.errors import DiskFullError, UserError
from pipeline.model.backbone import (
    PRESETS,
    amp_autocast,
    build_backbone,
    image_features,
    resolve_checkpoint,
    token_level,
    trunk_tokens,
)
from pipeline.model.lora import adapter_changes_tokens


class NonFiniteFeaturesError(UserError, RuntimeError):
    """The backbone produced NaN or Inf for an image."""


@dataclass(frozen=True)
class ExtractSummary:
    """What one extraction did, counted in cache rows (an image or one augmented copy each)."""

    cache_id: str
    path: Path
    extracted: int
    reused: int
    total: int
    seconds: float
    copies: int = 0
    """Rows among `total` that are augmented copies (the rest are the manifest's images)."""
    per_image: int = 0
    """Augmented copies of each training image (`--augment-copies`, or its default)."""

    def line(self) -> str:
        rows = (f"{self.total - self.copies} images + {self.copies} augmented copies "
                f"({self.per_image} of each training image, --augment-copies)" if self.copies
                else f"{self.total} images, no augmented copies")
        if not self.extracted:
            return f"nothing to extract: the cache already holds all {self.total} rows ({rows})"
        rate = self.extracted / self.seconds if self.seconds > 0 else 0.0
        return (f"extracted {self.extracted} rows in {self.seconds:.1f} s ({rate:.1f} rows/s), "
                f"reused {self.reused}; the manifest needs {self.total}: {rows}")


class _PreprocessedImages(Dataset):
    """(row, image (3, R, R) uint8, resized) for each (row, path, copy name or None); the
    worker normalises on its device."""

    def __init__(self, share: list[tuple[int, str, str | None]], resolution: int):
        self.share, self.transform = share, sam3_resize(resolution)

    def __len__(self) -> int:
        return len(self.share)

    def __getitem__(self, i: int):
        row, path, name = self.share[i]
        return row, self.transform(transform_image(name, read_image(path)))


SIGNATURE_FIELDS = ("backbone", "checkpoint", "adapter", "levels", "amp", "cache_block")
"""The `ExtractConfig` fields the cache signature is built from (the one list: the signature and
the extraction command that training prints both read it)."""


def cache_signature(config: ExtractConfig) -> dict:
    """Signature of the features `config` produces (fetches sam3.pt from the hub if needed)."""
    values = {name: getattr(config, name) for name in SIGNATURE_FIELDS}
    values["checkpoint"] = resolve_checkpoint(config.backbone, config.checkpoint)
    return build_signature(**values)


def run_extraction(config: ExtractConfig, samples: list[Sample], keys: list[str]) -> ExtractSummary:
    """Extract every sample missing from the cache of `config`; `keys[i]` is `samples[i]`'s key.

    With `config.augment_copies` K, K augmented copies of each training image too
    (`config.copy_plan`).
    """
    start = time.perf_counter()
    config = config.with_copies_for(samples)
    signature = cache_signature(config)
    context = DistributedContext.from_env(backend="gloo")  # coordination only
    jobs = extraction_jobs(samples, keys, config.copy_plan)
    unique = list(jobs)
    cache, path = None, cache_path(config.cache_dir, signature)
    with context.leader_lock(lambda: writer_lock(path, wait=config.wait)):
        if context.is_leader:
            preset = PRESETS[config.backbone]
            shapes = {lvl: preset.level_shape(lvl) for lvl in config.cache_levels}
            cache = FeatureCache.create_or_open(config.cache_dir, signature, shapes,
                                                codec=config.codec)
            cache.add_keys(unique)
        context.barrier()
        cache = cache or FeatureCache.open(path)
        rows, done = cache.done_for(unique)
        todo = [(int(r), *jobs[k]) for r, k, d in zip(rows, unique, done, strict=True) if not d]
        reused = len(unique) - len(todo)
        share = todo[context.rank :: context.world_size]
        context.barrier()  # every rank reads `done` before any rank's writes can change it
        if share:
            _extract_local(config, cache.path, share, context)
        context.barrier()
    copies = sum(name is not None for _, name in jobs.values())
    return ExtractSummary(cache.cache_id, cache.path, len(todo), reused, len(unique),
                          time.perf_counter() - start, copies, config.copy_plan.count)


def _extract_local(config: ExtractConfig, path: Path, share: list, context) -> None:
    """Extract `share` [(row, image path, augmentation)] with this machine's processes."""
    devices = config.worker_devices(context)
    if len(devices) == 1:
        bar = tqdm(total=len(share), unit="img", desc=f"extract {path.stem}", smoothing=0.1)
        with bar:
            extract_rows(config, path, share, devices[0], bar.update)
        return
    ctx = mp.get_context("spawn")
    progress = ctx.Queue()
    workers = [
        ctx.Process(target=_worker_main, daemon=False,
                    args=(config, path, share[i :: len(devices)], device, progress, i,
                          os.getpid()))
        for i, device in enumerate(devices)
    ]
    for worker in workers:
        worker.start()
    try:
        _follow(workers, progress, len(share), path.stem)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
            worker.join()


def _follow(workers, progress, total: int, name: str) -> None:
    """Aggregate the workers' progress into one bar; raise the first worker error."""
    with tqdm(total=total, unit="img", desc=f"extract {name}", smoothing=0.1) as bar:
        finished = 0
        while finished < len(workers):
            try:
                kind, value = progress.get(timeout=1.0)
            except queue.Empty:
                dead = [w for w in workers if w.exitcode not in (None, 0)]
                if dead:
                    raise WorkerError(
                        f"extraction worker exited with code {dead[0].exitcode}") from None
                continue
            if kind == "done":
                bar.update(value)
            elif kind == "finished":
                finished += 1
            elif kind == "error":
                raise WorkerError(value)


def _worker_main(config, path, share, device, progress, index, parent_pid) -> None:
    die_with_parent(parent_pid)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, config.workers)))
    try:
        extract_rows(config, path, share, device, lambda n: progress.put(("done", n)))
    except Exception as err:  # report in the parent, with the message that names the image
        progress.put(("error", f"worker {index} ({device}): {type(err).__name__}: {err}"))
        raise SystemExit(1) from err
    progress.put(("finished", index))


def extract_rows(config: ExtractConfig, path: Path, share: list, device: str, on_done) -> None:
    """Run the backbone on `share` [(row, path, augmentation)] on `device`, into the cache."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # An adapter that lives only after the split block cannot change the stored tokens.
    adapter = config.adapter if adapter_changes_tokens(config.adapter, config.cache_block) else None
    backbone = build_backbone(config.backbone, config.checkpoint, adapter).to(device)
    cache = FeatureCache.open(path, mode="r+")
    loader = DataLoader(
        _PreprocessedImages(share, backbone.preset.resolution),
        batch_size=config.batch_size, num_workers=config.loader_workers,
        pin_memory=device.type == "cuda", persistent_workers=False,
    )
    image_of_row = {row: path + (f" ({aug})" if aug else "") for row, path, aug in share}
    pending = []
    with ThreadPoolExecutor(config.writer_threads) as writers, torch.inference_mode():
        for batch_rows, images in loader:
            with amp_autocast(config.amp, device):
                out = _cached_outputs(backbone, normalize(images.to(device, non_blocking=True)),
                                      config)
            features, finite = stored_features(out)
            host = {lvl: f.cpu().numpy() for lvl, f in features.items()}
            for i, row in enumerate(batch_rows.tolist()):
                if not bool(finite[i]):
                    raise NonFiniteFeaturesError(
                        f"{image_of_row[row]}: the backbone produced NaN or Inf features "
                        f"(amp={config.amp}); try --amp off, or check the image")
                sample = {lvl: np.ascontiguousarray(v[i]) for lvl, v in host.items()}
                pending.append(writers.submit(_write, cache, row, sample, image_of_row[row]))
            pending = _drain(pending, keep=2 * config.batch_size, on_done=on_done)
        _drain(pending, keep=0, on_done=on_done)


def _cached_outputs(backbone, images: torch.Tensor, config: ExtractConfig) -> dict:
    """{level: (B, ...)} of what the cache stores: the levels (`image_features`), or the trunk's
    tokens after --cache-block K, (B, h, w, embed_dim)."""
    if config.cache_block is None:
        return image_features(backbone, images, config.levels)
    return {token_level(config.cache_block): trunk_tokens(backbone, images, config.cache_block)}


def stored_features(out: dict[str, torch.Tensor]
                    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """{level: (B, C, h, w)} backbone outputs (or trunk tokens (B, h, w, C)) -> (the same in
    float16 and C-contiguous, as the cache stores them; (B,) bool: every value of the sample
    finite at every level after the cast).

    One pass casts and lays out (CPU convolutions return channels-last maps, which would
    otherwise be copied again per sample). NaN and Inf (a value beyond float16's 65504 becomes
    Inf) propagate into a float32 sum per sample, which finite values cannot overflow: one
    reduction instead of a full-size isfinite mask (BENCHMARKS.md, extraction time split).
    """
    half = {lvl: f.to(torch.float16, memory_format=torch.contiguous_format)
            for lvl, f in out.items()}
    sums = torch.stack([f.sum(dim=(1, 2, 3), dtype=torch.float32) for f in half.values()])
    return half, sums.isfinite().all(0)


def _write(cache: FeatureCache, row: int, sample: dict, image: str) -> None:
    try:
        cache.write_sample(row, sample)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise DiskFullError(f"No space left on device while writing the features of "
                                f"{image} into {cache.path}. Samples written before stay valid: "
                                "free space (`sam3-vessel cache list` shows what caches "
                                "take) and run the same command again") from err
        raise


def _drain(pending: list, *, keep: int, on_done) -> list:
    """Wait for the oldest writes until at most `keep` are in flight; report each one done."""
    while len(pending) > keep or (pending and pending[0].done()):
        pending.pop(0).result()
        on_done(1)
    return pending
