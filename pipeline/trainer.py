"""The training loop of one process: cached epochs, end-to-end epochs, validation, checkpoints."""

from __future__ import annotations

import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from pipeline.augment import augmented_key
from pipeline.cache import CacheError, FeatureCache
from pipeline.checkpoint import load_checkpoint, save_adapter, save_checkpoint
from pipeline.datasets import SegmentationSamples, collate_samples, to_device
from pipeline.feature_batches import FeatureBatches
from pipeline.images import normalize
from pipeline.losses import dice_bce_loss
from pipeline.manifest import UNKNOWN_VIEW
from pipeline.metrics import SCORES, SegmentationMeter, format_summary, score_batch
from pipeline.reporting import MetricsLog, plot_curves, write_json, write_report
from pipeline.scoring import NativeTargets, save_native_overlays, scoring_note
from pipeline.segmenter import build_segmenter
from pipeline.tensorboard_log import TensorBoardLog
from pipeline.training import Prepared, ensure_cache, seed_everything


class _Data:
    """The datasets of one process, re-pointed at a new cache after a refresh."""

    def __init__(self, prepared: Prepared, cache: Path, context):
        self.prepared, self.context = prepared, context
        config = prepared.config
        self.resolution = _resolution(config.backbone)
        self.per_rank_batch = max(1, config.batch_size // context.world_size)
        self.val_targets = NativeTargets(prepared.val)  # validation scores at native size
        self.point_at(cache)

    def point_at(self, cache: Path) -> None:
        p, cfg = self.prepared, self.prepared.config
        store, augment = FeatureCache.open(cache), [cfg.copy_plan.names(k) for k in p.train_keys]
        train_keys = [[k] + [augmented_key(k, a) for a in names]
                      for k, names in zip(p.train_keys, augment, strict=True)]
        train_rows, val_rows = store.rows_for(sum(train_keys, [])), store.rows_for(p.val_keys)
        done = store.done()
        for rows in (train_rows, val_rows):
            if (rows < 0).any() or not done[rows].all():
                raise CacheError(f"{cache} lacks features of {int((rows < 0).sum())} images; "
                                 "extract them first (extract_features.py)")
        common = dict(resolution=self.resolution, views=p.views, with_image=cfg.image_branch)
        self.cache = cache
        # Cached epochs: the loader's workers decode masks (and images for the image branch);
        # `FeatureBatches` adds the features in this process (see pipeline.feature_batches).
        self.rows = {"train": train_rows.reshape(len(p.train), -1),
                     "val": val_rows.reshape(len(p.val), 1)}
        self.train_cached = SegmentationSamples(p.train, augment=augment, seed=cfg.seed,
                                                **common)
        self.val_cached = SegmentationSamples(p.val, **common)
        self.train_live = SegmentationSamples(p.train, resolution=self.resolution, views=p.views,
                                              augment=augment, seed=cfg.seed)
        self.val_live = SegmentationSamples(p.val, resolution=self.resolution, views=p.views)

    def epoch_steps(self, live: bool) -> int:
        """Optimizer steps of one training epoch (DistributedSampler pads to equal shares)."""
        cfg = self.prepared.config
        share = math.ceil(len(self.prepared.train) / self.context.world_size)
        steps = math.ceil(share / self.per_rank_batch)
        return min(steps, cfg.e2e_steps) if live and cfg.e2e_steps else steps

    def train_loader(self, epoch: int, live: bool):
        dataset = self.train_live if live else self.train_cached
        dataset.epoch = epoch
        sampler = DistributedSampler(dataset, num_replicas=self.context.world_size,
                                     rank=self.context.rank, shuffle=True,
                                     seed=self.prepared.config.seed)
        sampler.set_epoch(epoch)
        return self._loader(dataset, sampler, None if live else "train")

    def val_loader(self, live: bool):
        dataset = self.val_live if live else self.val_cached
        mine = list(range(self.context.rank, len(dataset), self.context.world_size))
        return self._loader(Subset(dataset, mine), None, None if live else "val")

    def _loader(self, dataset, sampler, cached_split: str | None):
        """A DataLoader; for a cached epoch (`cached_split` "train"/"val") wrapped in
        `FeatureBatches`, which adds each batch's features."""
        cfg = self.prepared.config
        pin = cfg.device == "cuda"
        loader = DataLoader(dataset, batch_size=self.per_rank_batch, sampler=sampler,
                            num_workers=cfg.loader_workers, pin_memory=pin,
                            collate_fn=collate_samples)
        if cached_split is None:
            return loader
        samples = self.prepared.train if cached_split == "train" else self.prepared.val
        return FeatureBatches(loader, cache_path=self.cache, rows=self.rows[cached_split],
                              levels=cfg.cache_levels, samples=samples, pin_memory=pin)

    def cached_features(self, split: str, indices: list[int]) -> dict[str, torch.Tensor]:
        """{stored level: (len(indices), ...) float16} of the original images (not copies)."""
        store, rows = FeatureCache.open(self.cache), self.rows[split][list(indices), 0]
        return {lvl: torch.stack([torch.from_numpy(store.read(int(r), [lvl], strict=True)[lvl])
                                  for r in rows])
                for lvl in self.prepared.config.cache_levels}


def _resolution(backbone: str) -> int:
    from pipeline.backbone import PRESETS

    return PRESETS[backbone].resolution


def _gather_meter(meter: SegmentationMeter, context) -> SegmentationMeter:
    if not context.distributed:
        return meter
    states = [None] * context.world_size
    dist.all_gather_object(states, meter.state())
    merged = SegmentationMeter()
    for state in states:
        merged.merge(SegmentationMeter.from_state(state))
    return merged


def _mean_across(value: float, count: int, context, device: torch.device) -> float:
    if not context.distributed:
        return value / max(count, 1)
    tensor = torch.tensor([value, float(count)], dtype=torch.float64, device=device)  # NCCL: GPU
    dist.all_reduce(tensor)
    return float(tensor[0] / max(tensor[1], 1))


def run_epoch(model, loader, device, views, *, optimizer=None, live=False, max_steps=0,
              show=True, desc="", centrelines: int | None = None, bar: tqdm | None = None,
              targets: NativeTargets | None = None
              ) -> tuple[SegmentationMeter, float, int, float]:
    """One pass; trains when `optimizer` is given. Returns (meter, loss sum, samples, wait s).

    Without `targets` (training) images are scored at the model's resolution against the
    resized masks, without AUC, and clDice only for the first `centrelines` images (None: all);
    with `targets` (validation) every score of every image at its own size (pipeline.scoring).
    Progress goes to `bar` (the whole run's) when given, else to a bar of this pass.
    """
    training = optimizer is not None
    meter, loss_sum, count, wait = SegmentationMeter(), 0.0, 0, 0.0
    # Scoring (a skeleton per mask for clDice: 5-40 ms at 1008 px) runs in threads beside the
    # next steps; results join the meter in step order.
    scoring, scored, joined = ThreadPoolExecutor(min(4, os.cpu_count() or 1)), [], 0
    steps = len(loader) if not max_steps else min(max_steps, len(loader))
    own_bar = bar is None
    if own_bar:
        bar = tqdm(total=steps, desc=desc, unit="step", disable=not show, leave=False)
    iterator, start = iter(loader), time.perf_counter()
    try:
        for _ in range(steps):
            t = time.perf_counter()
            batch = to_device(next(iterator), device)
            wait += time.perf_counter() - t
            with torch.set_grad_enabled(training):
                logits = model(batch, live=live)
                loss = dice_bce_loss(logits, batch["mask"])
            if training:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            n = len(batch["mask"])
            loss_sum, count = loss_sum + float(loss.detach()) * n, count + n
            if targets is None:
                pred = (logits.detach() > 0).squeeze(1).cpu().numpy()
                job = scoring.submit(
                    score_batch, pred, batch["mask"].squeeze(1).cpu().numpy() > 0.5,
                    centrelines=None if centrelines is None else max(0, centrelines - (count - n)))
            else:
                job = scoring.submit(targets.score, logits.detach().cpu(), batch["index"].tolist())
            scored.append((job, [views.label(i) for i in batch["view"].tolist()]))
            while joined < len(scored) and scored[joined][0].done():
                meter.add(scored[joined][0].result(), scored[joined][1])
                joined += 1
            rate = count / (time.perf_counter() - start)
            postfix = {"loss": f"{loss_sum / count:.4f}"}
            if meter.scores["dice"]:  # scores join a few steps late: no dice until then
                postfix["dice"] = f"{np.mean(meter.scores['dice']):.3f}"
            bar.set_postfix(postfix | {"samples_s": f"{rate:.1f}"}, refresh=False)
            bar.update()
    finally:
        if hasattr(iterator, "close"):  # FeatureBatches: stop its producer thread now
            iterator.close()
    if own_bar:
        bar.close()
    for future, labels in scored[joined:]:
        meter.add(future.result(), labels)
    scoring.shutdown()
    return meter, loss_sum, count, wait


@torch.no_grad()
def feature_drift(model, data: _Data, device, probe: int) -> float:
    """Mean cosine similarity of cached and live features (1x, or a split cache's tokens) on the
    first `probe` train images."""
    model.eval()
    indices = list(range(min(probe, len(data.train_cached))))
    level = data.prepared.config.cache_levels[0]  # 1x is always the first of sorted levels
    cached = data.cached_features("train", indices)[level]
    images = torch.stack([data.train_live.item(i, 0)["image"] for i in indices]).to(device)
    live = model.cache_features(images)[level].float().cpu()
    model.train()
    similarity = torch.nn.functional.cosine_similarity(cached.float().flatten(1), live.flatten(1))
    return float(similarity.mean())


def train_process(prepared: Prepared, context) -> None:
    """Train on this process's share; rank 0 writes the run directory."""
    config, run_dir, leader = prepared.config, prepared.run_dir, context.is_leader
    device = torch.device(context.local_device() if config.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    seed_everything(config.seed)
    use_angles = bool(prepared.train) and all(s.angles for s in prepared.train)
    model = build_segmenter(config, num_views=len(prepared.views.labels),
                            use_angles=use_angles).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: 0.5 * (1 + math.cos(math.pi * min(e, config.epochs) / config.epochs)))
    state = {"epoch": 0, "best": None, "cache": str(prepared.cache), "cache_current": True,
             "caches": [{"epoch": 0, "cache_id": prepared.cache.stem,
                         "adapter": config.adapter,
                         "adapter_sha256": prepared.signature["adapter_sha256"]}]}
    if config.resume:
        state = load_checkpoint(run_dir / "last.pt", model, optimizer, scheduler)
    log = MetricsLog(run_dir / "metrics.jsonl")
    if leader and config.resume:
        log.truncate_after(state["epoch"])
    data = _Data(prepared, _cache_under(Path(state["cache"]), config.cache_dir), context)
    tb = TensorBoardLog(run_dir, asdict(config), purge_step=state["epoch"] + 1) if (
        leader and config.tensorboard) else None
    bar = _run_bar(config, data, state["epoch"], leader)
    chosen = _spread_over_views(prepared.val, config.overlays)
    net = model
    if context.distributed:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.index is not None
                                      else None, find_unused_parameters=True)
    for epoch in range(state["epoch"] + 1, config.epochs + 1):
        e2e = bool(config.e2e_every) and epoch % config.e2e_every == 0
        model.train()
        start, lr = time.perf_counter(), optimizer.param_groups[0]["lr"]
        bar.set_description(f"epoch {epoch}/{config.epochs}{' e2e' if e2e else ''}")
        meter, loss_sum, count, wait = run_epoch(
            net, data.train_loader(epoch, e2e), device, prepared.views, optimizer=optimizer,
            live=e2e, max_steps=config.e2e_steps if e2e else 0, bar=bar,
            centrelines=config.train_cldice)
        seconds = time.perf_counter() - start
        train_record = {"epoch": epoch, "split": "train", "lr": lr, "e2e": e2e,
                        "loss": _mean_across(loss_sum, count, context, device), "seconds": seconds,
                        "data_wait": wait / seconds, "samples_per_s": count / seconds,
                        "cache": data.cache.stem,
                        **_scores(_gather_meter(meter, context).summary())}
        if e2e:
            state["cache_current"] = False  # the adapter moved; the cache did not
            if leader:
                train_record["drift_cosine"] = feature_drift(model, data, device, config.probe_size)
            if config.refresh_cache:
                _refresh(model, prepared, data, state, epoch, context)
        model.eval()
        live_val = not state["cache_current"]  # after end-to-end steps the cache lags the adapter
        vstart = time.perf_counter()
        # The unwrapped model: ranks may hold different numbers of validation batches, and a
        # DDP forward is a collective (it broadcasts buffers).
        vmeter, vloss, vcount, _ = run_epoch(model, data.val_loader(live_val), device,
                                             prepared.views, live=live_val, show=leader,
                                             desc="  validation", targets=data.val_targets)
        val = _gather_meter(vmeter, context).summary()
        val_record = {"epoch": epoch, "split": "val", "lr": lr, "e2e": live_val,
                      "loss": _mean_across(vloss, vcount, context, device),
                      "seconds": time.perf_counter() - vstart, **_scores(val)}
        scheduler.step()
        state["epoch"] = epoch
        if leader:
            _record(log, train_record, val_record if val["n"] else None, tb)
            if tb and chosen:
                tb.overlays(epoch, *_overlay_inputs(model, prepared, data, device, chosen,
                                                    live_val))
            _save(model, optimizer, scheduler, state, prepared, val, live_val)
        context.barrier()
    bar.close()
    if leader:
        _finish(model, prepared, data, device, log, state["caches"], tb)


def _cache_under(recorded: Path, cache_dir: str) -> Path:
    """The cache a checkpoint recorded, in `cache_dir` when it moved there (resume with
    --cache-dir): caches are named by their signature, so the name finds it."""
    moved = Path(cache_dir) / recorded.name
    return moved if not (recorded / "zarr.json").is_file() or moved.is_dir() else recorded


def _scores(summary: dict) -> dict:
    keep = (*SCORES, "per_view")
    return {k: summary[k] for k in keep if k in summary}


def _run_bar(config, data: _Data, done_epochs: int, show: bool) -> tqdm:
    """One bar over every optimizer step of the run; time left at the run's average pace
    (smoothing 0), validation included."""
    steps = [data.epoch_steps(bool(config.e2e_every) and e % config.e2e_every == 0)
             for e in range(1, config.epochs + 1)]
    return tqdm(total=sum(steps), initial=sum(steps[:done_epochs]), unit="step",
                smoothing=0, disable=not show, dynamic_ncols=True)


def _record(log: MetricsLog, train_record: dict, val_record: dict | None,
            tb: TensorBoardLog | None = None) -> None:
    for record in [train_record] + ([val_record] if val_record else []):
        log.append(record)
        if tb:
            tb.record(record)
    v = val_record or {}
    # tqdm.write: the line goes above the run's bar instead of through it.
    tqdm.write(f"epoch {train_record['epoch']}: train loss {train_record['loss']:.4f} "
               f"dice {train_record['dice']:.3f} | val dice {v.get('dice', float('nan')):.3f} "
               f"cldice {v.get('cldice', float('nan')):.3f} | {train_record['seconds']:.1f} s"
               f"{' (end to end)' if train_record['e2e'] else ''}")
    sys.stdout.flush()  # a log file sees each epoch as it ends


def _save(model, optimizer, scheduler, state, prepared, val, live_val) -> None:
    run_dir, epoch = prepared.run_dir, state["epoch"]
    score = val["dice"] if val["n"] else float(epoch)  # without val rows the last is the best
    best = state["best"]
    if best is None or score > best["score"]:
        state["best"] = {"score": score, "epoch": epoch, "val": {**val, "epoch": epoch,
                                                                  "features": "live" if live_val
                                                                  else "cached"}}
        save_checkpoint(run_dir / "best.pt", model, optimizer, scheduler, state, prepared)
        save_adapter(model, run_dir / "adapter")
    save_checkpoint(run_dir / "last.pt", model, optimizer, scheduler, state, prepared)


def _refresh(model, prepared: Prepared, data: _Data, state: dict, epoch: int, context) -> None:
    """Extract the cache of the adapter as it is now (all processes share the work)."""
    adapter_dir = prepared.run_dir / "adapters" / f"epoch-{epoch:03d}"
    if context.is_leader:
        save_adapter(model, adapter_dir)
    context.barrier()
    everyone = prepared.train + prepared.val
    from dataclasses import replace

    config = replace(prepared.config, extract_missing=True)
    cache, signature = ensure_cache(config, prepared.train_keys + prepared.val_keys, everyone,
                                    adapter=str(adapter_dir))
    data.point_at(cache)
    state["cache"] = str(cache)
    state["cache_current"] = True
    state["caches"].append({"epoch": epoch, "cache_id": cache.stem, "adapter": str(adapter_dir),
                            "adapter_sha256": signature["adapter_sha256"]})
    if context.is_leader:
        write_json(prepared.run_dir / "caches.json", state["caches"])


def _spread_over_views(samples, count: int) -> list[int]:
    """Up to `count` sample indices, taking each view in turn."""
    by_view: dict[str, list[int]] = {}
    for i, sample in enumerate(samples):
        by_view.setdefault(sample.view or UNKNOWN_VIEW, []).append(i)
    chosen, queues = [], [list(v) for v in by_view.values()]
    while len(chosen) < count and any(queues):
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(queue.pop(0))
    return chosen


def _overlay_inputs(model, prepared: Prepared, data: _Data, device, chosen: list[int],
                    live: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Validation samples `chosen` through the model: images (N, 3, R, R) in [-1, 1], masks and
    predictions (N, R, R) bool, on the CPU, and the image names."""
    dataset = data.val_live if live else data.val_cached
    batch = collate_samples([dataset[i] for i in chosen])
    if not live:
        batch["features"] = data.cached_features("val", chosen)
    batch = to_device(batch, device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        pred = (model(batch, live=live) > 0).squeeze(1).cpu()
    model.train(was_training)
    image = normalize(batch["image"].cpu() if "image" in batch else torch.stack(
        [data.val_live[i]["image"] for i in chosen]))
    return (image, batch["mask"].squeeze(1).cpu() > 0.5, pred,
            [prepared.val[i].image.name for i in chosen])


def _finish(model, prepared: Prepared, data: _Data, device, log: MetricsLog, caches,
            tb: TensorBoardLog | None = None) -> None:
    """report.json, curves.png and overlays/ for the best checkpoint."""
    run_dir, config = prepared.run_dir, prepared.config
    best_state = load_checkpoint(run_dir / "best.pt", model)
    best = best_state["best"]
    write_report(run_dir / "report.json", best["val"], scoring=scoring_note(prepared.val))
    plot_curves(log.read(), run_dir / "curves.png")
    chosen = _spread_over_views(prepared.val, config.overlays)
    if chosen:
        live = best["val"]["features"] == "live"
        if not live:  # the cache the best epoch was validated on, not a later one
            data.point_at(Path(best_state["cache"]))
        dataset = data.val_live if live else data.val_cached
        batch = collate_samples([dataset[i] for i in chosen])
        if not live:
            batch["features"] = data.cached_features("val", chosen)
        batch = to_device(batch, device)
        model.eval()
        with torch.no_grad():
            logits = model(batch, live=live).cpu()
        save_native_overlays(run_dir / "overlays", [prepared.val[i] for i in chosen], logits,
                             [data.val_targets.get(i) for i in chosen])
    write_json(run_dir / "caches.json", caches)
    if tb:
        tb.hparams(best["val"])
        tb.close()
    print(f"run directory: {run_dir}  best epoch {best['epoch']}: val dice "
          f"{best['val'].get('dice', float('nan')):.3f}", flush=True)
    if best["val"].get("n"):
        print("validation scores of the best epoch (each image at its own size):\n"
              + format_summary(best["val"]), flush=True)

