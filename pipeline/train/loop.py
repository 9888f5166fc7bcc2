"""The training loop of one process: a step budget of cached and end-to-end steps, validation
and checkpoints every `--val-every` steps."""

from __future__ import annotations

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
from tqdm import tqdm

from pipeline.data.images import normalize
from pipeline.data.manifest import UNKNOWN_VIEW
from pipeline.data.samples import collate_samples, to_device
from pipeline.errors import deferred_interrupts
from pipeline.model.losses import training_loss
from pipeline.model.segmenter import build_segmenter
from pipeline.train.checkpoint import (
    load_checkpoint,
    read_checkpoint,
    restore,
    save_adapter,
    save_checkpoint,
)
from pipeline.train.divergence import check_loss
from pipeline.train.metrics import SCORES, SegmentationMeter, format_summary, score_batch
from pipeline.train.reporting import MetricsLog, dice_hint, plot_curves, write_json, write_report
from pipeline.train.run_data import RunData
from pipeline.train.scoring import NativeTargets, save_native_overlays, scoring_note
from pipeline.train.setup import Prepared, ensure_cache, seed_everything
from pipeline.train.steps import (
    build_optimizer,
    build_scheduler,
    warmup_steps,
)
from pipeline.train.tensorboard_log import TensorBoardLog


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


def run_epoch(model, loader, device, views, *, optimizer=None, scheduler=None, live=False,
              max_steps=0, steps=None, show=True, desc="", centrelines: int | None = None,
              loss_name: str = "dice_bce", bar: tqdm | None = None,
              targets: NativeTargets | None = None, first_step: int = 1, infer=None
              ) -> tuple[SegmentationMeter, float, int, float, float]:
    """One pass over `loader` (or its first `steps`/`max_steps` batches); trains when
    `optimizer` is given, stepping `scheduler` after each optimizer step.

    Returns (meter, loss sum, samples, wait s, compute s): wait is the time spent getting
    batches, compute the time in forward, loss, backward and the optimizer.
    Without `targets` (training) images are scored at the model's resolution against the
    resized masks, without AUC, and clDice only for the first `centrelines` images (None: all);
    with `targets` (validation) every score of every image at its own size (pipeline.train.scoring).
    Progress goes to `bar` (the whole run's) when given, else to a bar of this pass.
    A non-finite training loss raises `DivergedError` naming the run's step (`first_step` is
    that of this pass's first batch). `infer(batch, live)` replaces `model(batch, live=live)`
    when not training (whole-image inference of the detail decoder: tiles, mirroring).
    """
    training = optimizer is not None
    meter, loss_sum, count, wait, compute = SegmentationMeter(), 0.0, 0, 0.0, 0.0
    # Scoring (a skeleton per mask for clDice, the costly part) runs in threads beside the
    # next steps; results join the meter in step order.
    scoring, scored, joined = ThreadPoolExecutor(min(4, os.cpu_count() or 1)), [], 0
    if steps is None:
        steps = len(loader) if not max_steps else min(max_steps, len(loader))
    own_bar = bar is None
    if own_bar:
        bar = tqdm(total=steps, desc=desc, unit="step", disable=not show, leave=False)
    iterator, start = iter(loader), time.perf_counter()
    try:
        for i in range(steps):
            t = time.perf_counter()
            batch = to_device(next(iterator), device)
            t_data = time.perf_counter()
            wait += t_data - t
            with torch.set_grad_enabled(training):
                logits = (infer(batch, live) if infer is not None and not training
                          else model(batch, live=live))
                loss = training_loss(loss_name, logits, batch["mask"])
                logits = logits[:, :1]  # deep supervision's auxiliary outputs are for the loss
            if training:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
            n, loss_value = len(batch["mask"]), float(loss.detach())  # syncs the device
            if training:
                check_loss(loss_value, first_step + i, "training", optimizer)
            compute += time.perf_counter() - t_data
            loss_sum, count = loss_sum + loss_value * n, count + n
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
        if hasattr(iterator, "close"):  # FeatureBatches, BatchStream: stop producers now
            iterator.close()
    if own_bar:
        bar.close()
    for future, labels in scored[joined:]:
        meter.add(future.result(), labels)
    scoring.shutdown()
    return meter, loss_sum, count, wait, compute


@torch.no_grad()
def feature_drift(model, data: RunData, device, probe: int) -> float:
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
    """Train on this process's share for the step budget; rank 0 writes the run directory.

    The budget (`TrainConfig.total_steps`) is cut into validation intervals of `--val-every`
    steps; every `--e2e-every`-th interval starts with `--e2e-steps` end-to-end steps (all of
    it when 0), then the drift probe runs. Each interval ends with a validation and last.pt.
    """
    config, run_dir, leader = prepared.config, prepared.run_dir, context.is_leader
    device = torch.device(context.local_device() if config.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    seed_everything(config.seed)
    use_angles = bool(prepared.train) and all(s.angles for s in prepared.train)
    model = build_segmenter(config, num_views=len(prepared.views.labels),
                            use_angles=use_angles).to(device)
    total = config.total_steps(len(prepared.train))
    interval = config.validation_interval(total, len(prepared.train))
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, total, warmup_steps(total, config.warmup))
    state = (load_checkpoint(run_dir / "last.pt", model, optimizer, scheduler) if config.resume
             else _fresh_state(prepared, total))
    log = MetricsLog(run_dir / "metrics.jsonl")
    if leader and config.resume:
        log.truncate_after(state["step"], key="step")
    data = RunData(prepared, _cache_under(Path(state["cache"]), config.cache_dir), context)
    data.stream.seek(state["stream"])
    if leader:
        per_epoch = data.stream.sampler.batches()
        print(f"training {total} steps ({total / per_epoch:.1f} epochs of {len(prepared.train)} "
              f"images), validating every {interval}", flush=True)
        if config.resume:
            best = state.get("best") or {}
            dice = (best.get("val") or {}).get("dice")
            left = (f"{total - state['step']} steps left" if state["step"] < total else
                    "every step is done: only the final scoring and the report are redone")
            so_far = (f"; best val Dice so far {dice:.3f} (step {best.get('step')})"
                      if dice is not None else "")
            print(f"resuming {run_dir} at step {state['step']} of {total}: {left}{so_far}",
                  flush=True)
    tb = TensorBoardLog(run_dir, asdict(config), purge_step=state["step"] + 1) if (
        leader and config.tensorboard) else None
    # One bar over every optimizer step of the run; time left at the run's average pace.
    bar = tqdm(total=total, initial=state["step"], unit="step", smoothing=0, disable=not leader,
               dynamic_ncols=True)
    chosen = _spread_over_views(prepared.val, config.overlays)
    net = model
    if context.distributed:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.index is not None
                                      else None, find_unused_parameters=True)
    while state["step"] < total:
        first, steps = state["step"], min(interval, total - state["step"])
        e2e = bool(config.e2e_every) and (first // interval + 1) % config.e2e_every == 0
        train_record = _train_interval(net, model, data, prepared, state, steps, e2e, optimizer,
                                       scheduler, device, context, bar)
        model.eval()
        live_val = not state["cache_current"]  # after end-to-end steps the cache lags the adapter
        vstart = time.perf_counter()
        # The unwrapped model: ranks may hold different numbers of validation batches, and a
        # DDP forward is a collective (it broadcasts buffers).
        # Its own bar only on a terminal: a log file would get one line per redraw.
        vmeter, vloss, vcount, _, _ = run_epoch(model, data.val_loader(live_val), device,
                                                prepared.views, live=live_val,
                                                show=leader and sys.stderr.isatty(),
                                                desc="  validation", loss_name=config.loss,
                                                targets=data.val_targets,
                                                infer=_whole_image(model, config, mirror=False))
        val = _gather_meter(vmeter, context).summary()
        val_record = {"step": state["step"], "epoch": train_record["epoch"], "split": "val",
                      "lr": train_record["lr"], "e2e": live_val,
                      "loss": _mean_across(vloss, vcount, context, device),
                      "seconds": time.perf_counter() - vstart, **_scores(val)}
        if val["n"]:  # weights made non-finite by the interval's last step
            check_loss(val_record["loss"], state["step"], "validation", optimizer)
        state["stream"] = data.stream.position
        if leader:
            _record(log, train_record, val_record if val["n"] else None, total, tb)
            if tb and chosen:
                tb.overlays(state["step"], *_overlay_inputs(model, prepared, data, device,
                                                            chosen, live_val))
            with deferred_interrupts():  # a signal waits until last.pt and best.pt are whole
                _save(model, optimizer, scheduler, state, prepared, val, live_val)
        context.barrier()
    bar.close()
    final = _final_validation(model, prepared, data, device, context)
    if leader:
        _finish(model, prepared, data, device, log, state["caches"], tb, final)
    data.close()


def _final_validation(model, prepared: Prepared, data: RunData, device, context
                      ) -> dict | None:
    """The best checkpoint's validation scores with mirror TTA (`--mirror-tta`, the detail
    decoder), which report.json gives; None without it. Periodic validations only choose the
    best step, so they run unmirrored at a quarter of the cost, as nnU-Net validates its
    final model alone with mirroring. Every process runs its share; the model ends holding
    the best checkpoint's weights."""
    config = prepared.config
    if not (config.mirror_tta and config.decoder == "detail" and prepared.val):
        return None
    best_state = restore(_leaders_best(prepared.run_dir, context), model)
    best = best_state["best"]
    live = best["val"]["features"] == "live"
    if not live:  # the cache the best step was validated on, not a later one
        data.point_at(_cache_under(Path(best_state["cache"]), config.cache_dir))
    model.eval()
    start = time.perf_counter()
    meter, _, _, _, _ = run_epoch(model, data.val_loader(live), device, prepared.views,
                                  live=live, show=context.is_leader and sys.stderr.isatty(),
                                  desc="  final validation, mirror TTA", loss_name=config.loss,
                                  targets=data.val_targets,
                                  infer=_whole_image(model, config, mirror=True))
    val = _gather_meter(meter, context).summary()
    return {**val, "step": best["step"], "features": best["val"]["features"],
            "mirror_tta": True, "seconds": round(time.perf_counter() - start, 1),
            "unmirrored": {k: best["val"][k] for k in SCORES if k in best["val"]}}


def _leaders_best(run_dir: Path, context) -> dict:
    """best.pt's weights and state as the leader reads them, on every process: processes on
    other machines may have no run directory, so the leader sends them (a few MB: decoder and
    adapter)."""
    payload = read_checkpoint(run_dir / "best.pt") if context.is_leader else None
    if not context.distributed:
        return payload
    box = [payload and {k: payload[k] for k in ("decoder", "lora", "state")}]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _cache_under(recorded: Path, cache_dir: str) -> Path:
    """The cache a checkpoint recorded, in `cache_dir` when it moved there (resume with
    --cache-dir): caches are named by their signature, so the name finds it."""
    moved = Path(cache_dir) / recorded.name
    return moved if not (recorded / "zarr.json").is_file() or moved.is_dir() else recorded


def _fresh_state(prepared: Prepared, total: int) -> dict:
    """The training state a checkpoint saves: step, data-order position, best, caches."""
    return {"step": 0, "stream": {"epoch": 0, "offset": 0}, "best": None,
            "total_steps": total, "cache": str(prepared.cache), "cache_current": True,
            "caches": [{"step": 0, "cache_id": prepared.cache.stem,
                        "adapter": prepared.config.adapter,
                        "adapter_sha256": prepared.signature["adapter_sha256"]}]}


def _train_interval(net, model, data: RunData, prepared: Prepared, state: dict, steps: int,
                    e2e: bool, optimizer, scheduler, device, context, bar: tqdm) -> dict:
    """`steps` optimizer steps (the first `--e2e-steps` end to end when `e2e`); the train
    record of metrics.jsonl. Updates state["step"] (and the cache state after e2e steps)."""
    config, first = prepared.config, state["step"]
    live_steps = (min(config.e2e_steps, steps) if config.e2e_steps else steps) if e2e else 0
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start, lrs = time.perf_counter(), {g["name"]: g["lr"] for g in optimizer.param_groups}
    meter, loss_sum, count, wait, compute = SegmentationMeter(), 0.0, 0, 0.0, 0.0
    for live, n in ((True, live_steps), (False, steps - live_steps)):
        if not n:
            continue
        bar.set_description(f"steps {first + 1}-{first + steps}{' e2e' if live else ''}")
        part = run_epoch(
            net, data.stream.take(n, live), device, prepared.views, optimizer=optimizer,
            scheduler=scheduler, live=live, steps=n, bar=bar,
            centrelines=max(0, config.train_cldice - count), loss_name=config.loss,
            first_step=first + 1 + (0 if live else live_steps))
        meter.merge(part[0])
        loss_sum, count = loss_sum + part[1], count + part[2]
        wait, compute = wait + part[3], compute + part[4]
        if live:
            state["cache_current"] = False  # the adapter moved; the cache did not
    state["step"] = first + steps
    seconds = time.perf_counter() - start
    stream = data.stream  # epochs of the sampler done: 1.0 at the end of the first
    record = {"step": state["step"],
              "epoch": round(stream.epoch + stream.offset / stream.sampler.batches(), 3),
              "split": "train", "lr": lrs["head"], "lora_lr": lrs["lora"], "e2e": e2e,
              "e2e_steps": live_steps, "steps": steps,
              "loss": _mean_across(loss_sum, count, context, device), "seconds": seconds,
              "data_wait": wait / seconds, "compute": compute / seconds,
              "samples_per_s": count / seconds, "cache": data.cache.stem,
              **_scores(_gather_meter(meter, context).summary())}
    if device.type == "cuda":  # this process's peak of the interval's steps, in GiB
        record["gpu_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    if e2e:
        if context.is_leader:
            record["drift_cosine"] = feature_drift(model, data, device, config.probe_size)
        if config.refresh_cache:
            _refresh(model, prepared, data, state, state["step"], context)
    return record


def _scores(summary: dict) -> dict:
    keep = (*SCORES, "per_view")
    return {k: summary[k] for k in keep if k in summary}


def _record(log: MetricsLog, train_record: dict, val_record: dict | None, total: int,
            tb: TensorBoardLog | None = None) -> None:
    for record in [train_record] + ([val_record] if val_record else []):
        log.append(record)
        if tb:
            tb.record(record)
    v = val_record or {}
    # tqdm.write: the line goes above the run's bar instead of through it.
    tqdm.write(f"step {train_record['step']}/{total}: train loss {train_record['loss']:.4f} "
               f"dice {train_record['dice']:.3f} | val dice {v.get('dice', float('nan')):.3f} "
               f"cldice {v.get('cldice', float('nan')):.3f} | {train_record['seconds']:.1f} s"
               f"{' (end to end)' if train_record['e2e'] else ''}{dice_hint(v, total)}")
    sys.stdout.flush()  # a log file sees each interval as it ends


def _save(model, optimizer, scheduler, state, prepared, val, live_val) -> None:
    run_dir, step = prepared.run_dir, state["step"]
    score = val["dice"] if val["n"] else float(step)  # without val rows the last is the best
    best = state["best"]
    if best is None or score > best["score"]:
        state["best"] = {"score": score, "step": step, "val": {**val, "step": step,
                                                                "features": "live" if live_val
                                                                else "cached"}}
        save_checkpoint(run_dir / "best.pt", model, optimizer, scheduler, state, prepared)
        save_adapter(model, run_dir / "adapter")
    save_checkpoint(run_dir / "last.pt", model, optimizer, scheduler, state, prepared)


def _refresh(model, prepared: Prepared, data: RunData, state: dict, step: int, context) -> None:
    """Extract the cache of the adapter as it is now (all processes share the work)."""
    adapter_dir = prepared.run_dir / "adapters" / f"step-{step:06d}"
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
    state["caches"].append({"step": step, "cache_id": cache.stem, "adapter": str(adapter_dir),
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


def _whole_image(model, config, *, mirror: bool):
    """`run_epoch`'s `infer`: whole-image inference with the run's tiles, mirrored or not."""
    return lambda batch, live: model.infer(batch, live, tile_size=config.tile_size,
                                           mirror=mirror)


def _chosen_logits(model, data: RunData, device, chosen: list[int], live: bool,
                   mirror: bool = False) -> tuple[list[torch.Tensor], list[dict]]:
    """Validation samples `chosen` through the model in eval mode, one at a time (whole images
    differ in size): per sample its logits (1, h, w) float32 on the CPU and its item."""
    dataset = data.val_live if live else data.val_cached
    was_training = model.training
    model.eval()
    infer = _whole_image(model, data.prepared.config, mirror=mirror)
    logits, items = [], []
    for i in chosen:
        item = dataset[i]
        batch = collate_samples([item])
        if not live:
            batch["features"] = data.cached_features("val", [i])
        with torch.no_grad():
            logits.append(infer(to_device(batch, device), live)[0].cpu())
        items.append(item)
    model.train(was_training)
    return logits, items


def _overlay_inputs(model, prepared: Prepared, data: RunData, device, chosen: list[int],
                    live: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Validation samples `chosen` through the model: images (N, 3, R, R) in [-1, 1], masks and
    predictions (N, R, R) bool, on the CPU, and the image names (whole images at their own
    size are brought to the backbone's R x R for TensorBoard)."""
    logits, items = _chosen_logits(model, data, device, chosen, live)
    size = (data.resolution, data.resolution)

    def square(x: torch.Tensor) -> torch.Tensor:  # (1, h, w) -> (R, R)
        return torch.nn.functional.interpolate(x[None].float(), size=size, mode="bilinear",
                                               align_corners=False)[0, 0]

    image = normalize(torch.stack([data.val_live[i]["image"] if "image" not in item
                                   else item["image"] for i, item in zip(chosen, items,
                                                                         strict=True)]))
    masks = torch.stack([square(item["mask"]) >= 0.5 for item in items])
    preds = torch.stack([square(item_logits) > 0 for item_logits in logits])
    return image, masks, preds, [prepared.val[i].image.name for i in chosen]


def _finish(model, prepared: Prepared, data: RunData, device, log: MetricsLog, caches,
            tb: TensorBoardLog | None = None, final: dict | None = None) -> None:
    """report.json, curves.png and overlays/ for the best checkpoint; `final`: its mirrored
    scores (`_final_validation`), which the report gives instead of the periodic ones."""
    run_dir, config = prepared.run_dir, prepared.config
    best_state = load_checkpoint(run_dir / "best.pt", model)
    best = best_state["best"]
    val = final or best["val"]
    write_report(run_dir / "report.json", val,
                 scoring=scoring_note(prepared.val, mirror_tta=final is not None))
    plot_curves(log.read(), run_dir / "curves.png", final)
    chosen = _spread_over_views(prepared.val, config.overlays)
    if chosen:
        live = best["val"]["features"] == "live"
        if not live:  # the cache the best epoch was validated on, not a later one
            data.point_at(_cache_under(Path(best_state["cache"]), config.cache_dir))
        logits, _ = _chosen_logits(model, data, device, chosen, live, mirror=final is not None)
        save_native_overlays(run_dir / "overlays", [prepared.val[i] for i in chosen], logits,
                             [data.val_targets.get(i) for i in chosen])
    write_json(run_dir / "caches.json", caches)
    if tb:
        tb.hparams(val)
        tb.close()
    mirrored = (f" with mirror TTA ({best['val'].get('dice', float('nan')):.3f} without)"
                if final else "")
    print(f"run directory: {run_dir}  best step {best['step']}: val dice "
          f"{val.get('dice', float('nan')):.3f}{mirrored}", flush=True)
    if val.get("n"):
        print(f"validation scores of the best step (each image at its own size"
              f"{', mirror TTA' if final else ''}):\n" + format_summary(val), flush=True)
