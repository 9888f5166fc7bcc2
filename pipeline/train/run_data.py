"""The datasets and loaders of one training process (`RunData`): cached and live samples of
both splits, their loaders, and the cache rows they read (re-pointed after a refresh)."""

from __future__ import annotations

import atexit
import os
import signal
import weakref
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from pipeline.cache.feature_batches import FeatureBatches
from pipeline.cache.lock import hold_for_reading
from pipeline.cache.store import CacheError, FeatureCache
from pipeline.data.augment import augmented_key
from pipeline.data.samples import DecodedSamples, SegmentationSamples, collate_samples
from pipeline.train.scoring import NativeTargets
from pipeline.train.setup import Prepared
from pipeline.train.steps import BatchStream, EpochSampler


def _quiet_sigterm(worker_id: int) -> None:
    """A loader worker ends with status 0 on SIGTERM (Slurm sends it to every process of the
    job): killed by the signal, it would make PyTorch raise 'DataLoader worker killed' into
    the training process while that writes its report."""
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))


def _native_pixels(prepared: Prepared, sampling) -> int:
    """Pixels (h * w) of the largest of the first few images as the detail decoder sees them
    (0 for the legacy decoder): what `DecodedSamples` keeps per item besides the (R, R) parts."""
    if sampling is None:
        return 0
    from pipeline.data.images import read_image

    probe = (prepared.train + prepared.val)[:4]
    return max(h * w for h, w in (sampling.size(*read_image(s.image).shape[-2:])
                                  for s in probe))


class RunData:
    """The datasets and loaders of one process, re-pointed at a new cache after a refresh.

    Loaders live for the whole run (persistent workers, or none when the split's decoded
    samples fit in `--memory-cache-mb`): a small set pays no start-up per epoch.
    """

    def __init__(self, prepared: Prepared, cache: Path, context):
        self.prepared, self.context = prepared, context
        config = prepared.config
        self.resolution = prepared.signature["resolution"]  # (R, R) of the cached features
        self.per_rank_batch = max(1, config.batch_size // context.world_size)
        augment = [config.copy_plan.names(k) for k in prepared.train_keys]
        native = {"train": config.native_training, "val": config.native_whole}
        pixels = _native_pixels(prepared, native["val"])
        self.memory = {
            split: DecodedSamples() if DecodedSamples.fits(count, self.resolution,
                                                           config.memory_cache_mb,
                                                           pixels) else None
            for split, count in (("train", len(prepared.train) * (1 + len(augment[0]))),
                                 ("val", len(prepared.val)))}
        common = dict(resolution=self.resolution, views=prepared.views)
        # The legacy decoder's image branch takes the (R, R) image; the detail decoder its
        # "pixels", and the (R, R) image only for the backbone (live steps).
        image_branch = config.image_branch and native["train"] is None
        self.train_cached = SegmentationSamples(prepared.train, augment=augment, seed=config.seed,
                                                with_image=image_branch, native=native["train"],
                                                memory=self.memory["train"], **common)
        self.val_cached = SegmentationSamples(prepared.val, with_image=image_branch,
                                              native=native["val"], memory=self.memory["val"],
                                              **common)
        self.train_live = SegmentationSamples(prepared.train, augment=augment, seed=config.seed,
                                              native=native["train"],
                                              memory=self.memory["train"], **common)
        self.val_live = SegmentationSamples(prepared.val, native=native["val"],
                                            memory=self.memory["val"], **common)
        # Whole images at their own sizes do not stack: one a batch.
        self.val_batch = 1 if native["val"] is not None else self.per_rank_batch
        self.sampler = EpochSampler(self.train_cached, num_replicas=context.world_size,
                                    rank=context.rank, seed=config.seed,
                                    batch_size=self.per_rank_batch)
        mine = list(range(context.rank, len(prepared.val), context.world_size))
        self.loaders = {
            ("train", False): self._loader(self.train_cached, self.sampler, "train"),
            ("train", True): self._loader(self.train_live, self.sampler, "train"),
            ("val", False): self._loader(Subset(self.val_cached, mine), None, "val"),
            ("val", True): self._loader(Subset(self.val_live, mine), None, "val")}
        self.stream = BatchStream(self.sampler, {False: self.train_cached, True: self.train_live},
                                  lambda live: self.train_loader(live))
        self.val_targets = NativeTargets(prepared.val)  # validation scores at native size
        self.readers: list = []
        self.point_at(cache)
        # Also when the run ends by an error or Ctrl-C (`close`'s docstring says why).
        close = weakref.WeakMethod(self.close)
        atexit.register(lambda: close() and close()())

    def point_at(self, cache: Path) -> None:
        p, cfg = self.prepared, self.prepared.config
        store, augment = FeatureCache.open(cache), [cfg.copy_plan.names(k) for k in p.train_keys]
        self.readers.append(hold_for_reading(cache))  # `cache rm` refuses it while we run
        train_keys = [[k] + [augmented_key(k, a) for a in names]
                      for k, names in zip(p.train_keys, augment, strict=True)]
        (train_rows, train_done), (val_rows, val_done) = (store.done_for(sum(train_keys, [])),
                                                          store.done_for(p.val_keys))
        for rows, done in ((train_rows, train_done), (val_rows, val_done)):
            if not done.all():
                raise CacheError(f"{cache} lacks features of {int((rows < 0).sum())} images; "
                                 "extract them first (`sam3-vessel extract`)")
        self.cache = cache
        self.rows = {"train": train_rows.reshape(len(p.train), -1),
                     "val": val_rows.reshape(len(p.val), 1)}

    def close(self) -> None:
        """End the loaders' worker processes now. Left to interpreter exit, the persistent
        workers of a pinning (CUDA) loader are each joined for 5 s before being killed
        (pytorch#81794): 40 s of silence after a run's last line with 2 loaders of 4 workers.
        The workers only read, so ending them loses nothing."""
        for loader in self.loaders.values():
            iterator = getattr(loader, "_iterator", None)  # persistent workers live there
            if iterator is None:
                continue
            for worker in getattr(iterator, "_workers", ()):
                worker.terminate()
            iterator._shutdown_workers()  # joins the now-dead workers and the pin thread
            loader._iterator = None

    def train_loader(self, live: bool):
        """The training loader (its order: `self.sampler`); cached: wrapped in FeatureBatches."""
        return self._with_features(self.loaders["train", live], None if live else "train")

    def val_loader(self, live: bool):
        return self._with_features(self.loaders["val", live], None if live else "val")

    def _loader(self, dataset, sampler, split: str) -> DataLoader:
        cfg = self.prepared.config
        # Decoded samples in memory leave the workers nothing to do but start up.
        workers = 0 if self.memory[split] is not None else cfg.loader_workers
        batch = self.per_rank_batch if split == "train" else self.val_batch
        return DataLoader(dataset, batch_size=batch, sampler=sampler,
                          num_workers=workers, persistent_workers=workers > 0,
                          pin_memory=cfg.device == "cuda", collate_fn=collate_samples,
                          worker_init_fn=_quiet_sigterm if workers else None)

    def _with_features(self, loader, cached_split: str | None):
        """`loader` as is (live), or wrapped in `FeatureBatches`, which adds the features."""
        if cached_split is None:
            return loader
        samples = self.prepared.train if cached_split == "train" else self.prepared.val
        return FeatureBatches(loader, cache_path=self.cache, rows=self.rows[cached_split],
                              levels=self.prepared.config.cache_levels, samples=samples,
                              pin_memory=self.prepared.config.device == "cuda")

    def cached_features(self, split: str, indices: list[int]) -> dict[str, torch.Tensor]:
        """{stored level: (len(indices), ...) float16} of the original images (not copies)."""
        store, rows = FeatureCache.open(self.cache), self.rows[split][list(indices), 0]
        return {lvl: torch.stack([torch.from_numpy(store.read(int(r), [lvl], strict=True)[lvl])
                                  for r in rows])
                for lvl in self.prepared.config.cache_levels}
