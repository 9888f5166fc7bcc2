"""Cached features of each training batch, read in the training process, one batch ahead.

DataLoader worker processes hand every tensor to the trainer through shared memory, and that
transfer, not the read, bounds how fast features reach the GPU: sam3 stores 2.65 MB per sample at
1x, 13 MB with 2x, 55 MB with 4x (BENCHMARKS.md measures the DataLoader's own ceiling). So the
workers decode only what needs a CPU (masks, images, views), and `FeatureBatches` reads each
batch's chunks with threads straight into one (pinned, on CUDA) batch tensor per level, in a
producer thread that runs ahead of the model.

Off CUDA the batch tensors are a ring of `AHEAD + 2` buffers, allocated once per pass after the
loader has forked its workers: a fresh 21 MB tensor per batch (sam3, 1x, batch 8) costs 5,000
page faults, and a reused heap page shared with a forked worker a copy-on-write fault each
(BENCHMARKS.md). Pinned buffers (CUDA) come from torch's caching host allocator, which already
reuses them and tracks pending copies.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from queue import Full, Queue

import numpy as np
import torch

from pipeline.cache.store import CacheError, FeatureCache, repair_command

_END = object()


class FeatureBatches:
    """Iterates `loader` (batches of `SegmentationSamples` without "features"), adding
    batch["features"] = {level: (B, 256, h, w) float16} read from the cache at `cache_path`.

    `rows` (N, 1 + K): the cache row of each sample of the loader's dataset (and of its K
    augmented copies), picked by the batch's "index" and "copy". `samples` names the image in
    errors. A producer thread fills batches ahead of the caller, so reads overlap its steps.

    Without `pin_memory`, a batch's feature tensors are valid until the batch after it is
    requested; copy them to keep them longer.
    """

    AHEAD = 2

    def __init__(self, loader, *, cache_path: Path, rows: np.ndarray, levels: tuple[str, ...],
                 samples: list, pin_memory: bool, threads: int | None = None):
        self.loader, self.cache_path, self.levels = loader, Path(cache_path), tuple(levels)
        self.rows, self.samples, self.pin_memory = np.asarray(rows), samples, pin_memory
        self.threads = threads or min(8, os.cpu_count() or 1)
        self._cache: FeatureCache | None = None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        """Batches in the loader's order. A producer thread pulls the loader and reads features
        while the caller works on earlier batches (up to `AHEAD` finished batches wait)."""
        queue, stop = Queue(maxsize=self.AHEAD), threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    queue.put(item, timeout=0.1)
                    return True
                except Full:
                    continue
            return False

        # Made here, in the caller's thread: the pin-memory thread takes its device from it.
        batches = iter(self.loader)

        # Safe reuse: batch j is filled only after batch j - 1 was queued, so the caller has taken
        # batch j - AHEAD - 1 and released batch j - AHEAD - 2, whose buffers j takes.
        ring = None if self.pin_memory else [{} for _ in range(self.AHEAD + 2)]

        def produce() -> None:
            try:
                with ThreadPoolExecutor(self.threads, thread_name_prefix="features") as pool:
                    for j, batch in enumerate(batches):
                        buffers = ring[j % len(ring)] if ring else None
                        for read in self._submit(pool, batch, buffers):
                            read.result()
                        if not put(batch):
                            return
                put(_END)
            except BaseException as err:  # handed to the caller, raised there
                put(err)

        producer = threading.Thread(target=produce, name="feature-batches", daemon=True)
        producer.start()
        try:
            while True:
                item = queue.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    error, item = item, None  # no frame-traceback cycle keeps the loader alive
                    raise error
                yield item
        finally:
            stop.set()
            producer.join()

    def _submit(self, pool: ThreadPoolExecutor, batch: dict,
                buffers: dict[str, torch.Tensor] | None) -> list[Future]:
        """Start reading `batch`'s features into `buffers` (reused, grown as needed) or, when
        None, into new pinned tensors."""
        if self._cache is None:
            self._cache = FeatureCache.open(self.cache_path)
        index, copy = np.asarray(batch["index"]), np.asarray(batch["copy"])
        rows = self.rows[index, copy]
        out = {}
        for lvl in self.levels:
            shape = (len(rows), *self._cache.level_shape(lvl))
            if buffers is None:
                out[lvl] = torch.empty(shape, dtype=torch.float16, pin_memory=True)
                continue
            if lvl not in buffers or len(buffers[lvl]) < len(rows):
                buffers[lvl] = torch.empty(shape, dtype=torch.float16)
            out[lvl] = buffers[lvl][: len(rows)]
        batch["features"] = out
        return [pool.submit(self._read, int(index[j]), int(row), lvl, out[lvl][j].numpy())
                for j, row in enumerate(rows) for lvl in self.levels]

    def _read(self, i: int, row: int, level: str, out: np.ndarray) -> None:
        try:
            self._cache.read_into(row, level, out, strict=True)
        except Exception as err:
            raise CacheError(
                f"{self.cache_path}: features of {self.samples[i].image} (row {row}), manifest "
                f"row {self.samples[i].row}, are unreadable ({type(err).__name__}: {err}); run "
                f"`{repair_command(self.cache_path)}`, then `sam3-vessel extract` again"
            ) from err
