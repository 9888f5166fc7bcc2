"""Vessel masks for new images from a trained run.

    python -m pipeline.predict --run runs/20261126-101500 --data new.csv --out predictions/

Features come from the cache when it holds them for the run's adapter (the cache the run trained
on while its adapter had not moved, or the cache of the run's saved adapter); every other image
goes through the backbone. From a split cache (`--cache-block K`) the stored tokens go through
the rest of the trunk with the run's adapter. Masks are written as 0/255 PNG at each image's own
size.

Rows with a mask are scored as validation is (`train.scoring`: at the image's own size, inside
its `fov` when given): every score per row in predictions.csv, the means overall and per view in
`report.json`, on the console, and overlays of the first `--overlays` rows in `overlays/`.
Each row's `split` is the run's use of its image (train, val, test, or `new`: never seen), and
`report.json` scores each split apart (`by_split`): scores of training images are not held out.
`--out` belongs to one prediction (`pipeline.prediction_folder`): an earlier one needs
`--overwrite`.

`--data` may also name DICOM runs (folders or files): `pipeline.predict_dicom` predicts them
without a manifest and writes a Segmentation object, a review video and frames.csv per run.
"""

from __future__ import annotations

import csv
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline.cache.feature_batches import FeatureBatches
from pipeline.cache.store import FeatureCache
from pipeline.data.checks import check_manifest
from pipeline.data.demo import resolve_data
from pipeline.data.images import read_image, read_mask
from pipeline.data.manifest import UNKNOWN_VIEW, Sample
from pipeline.data.samples import SegmentationSamples, ViewVocabulary, collate_samples, to_device
from pipeline.extraction import cache_signature
from pipeline.model.segmenter import build_segmenter
from pipeline.prediction_folder import NEW, claim_prediction_folder, row_splits
from pipeline.train.checkpoint import read_checkpoint, restore
from pipeline.train.metrics import SCORES, SegmentationMeter, format_summary, score_image
from pipeline.train.reporting import save_overlays, write_json
from pipeline.train.scoring import native_logits, scoring_note, signed_image
from pipeline.train.setup import resume_config


def load_run(run_dir: Path, device: torch.device):
    """(model in eval mode with the best weights, its checkpoint state, config, views)."""
    config = resume_config(run_dir)
    payload = read_checkpoint(run_dir / "best.pt")
    views = ViewVocabulary(tuple(payload["views"]))
    model = build_segmenter(config, num_views=len(views.labels), use_angles=payload["use_angles"])
    state = restore(payload, model)
    return model.to(device).eval(), state, config, views


def _feature_cache(run_dir: Path, state: dict, config) -> FeatureCache | None:
    if state.get("cache_current"):  # missing (moved or removed): through the backbone
        path = Path(state["cache"])
        return FeatureCache.open(path) if (path / "zarr.json").is_file() else None

    signature = cache_signature(config.extract_config(adapter=str(run_dir / "adapter")))
    return FeatureCache.find(config.cache_dir, signature)


def predict(run_dir: Path, data: Path, out: Path, *, device: str = "cpu",
            batch_size: int = 8, loader_workers: int = 2, show: bool = True,
            overlays: int = 6, overwrite: bool = False) -> list[dict]:
    """Write one mask per manifest row into `out`; returns the rows of `out/predictions.csv`.

    Rows with masks are scored (report.json); the first `overlays` rows get an overlay PNG."""
    device = torch.device(device)
    model, state, config, views = load_run(run_dir, device)
    samples = resolve_data(str(data), config.cache_dir)  # `demo`: the run's demo set
    report = check_manifest(samples, require_masks=False)
    report.raise_if_errors()
    claim_prediction_folder(out, overwrite=overwrite)
    views.warn_unseen(samples, str(data))
    cache = _feature_cache(run_dir, state, config)
    rows, cached = (cache.done_for(report.keys) if cache is not None
                    else (np.full(len(samples), -1), np.zeros(len(samples), bool)))
    out.mkdir(parents=True, exist_ok=True)
    written, outputs = [], _Outputs(samples, out, overlays)
    outputs.mirror_tta = bool(model.native and config.mirror_tta)
    outputs.splits = dict(zip((s.row for s in samples), row_splits(run_dir, samples, report.keys),
                              strict=True))
    bar = tqdm(total=len(samples), unit="img", desc="predict", disable=not show)

    def dataset(chosen: list[int], with_image: bool, native) -> SegmentationSamples:
        return SegmentationSamples([samples[i] for i in chosen], resolution=model.resolution,
                                   views=views, with_masks=False, with_image=with_image,
                                   native=native)

    pool, pending = ThreadPoolExecutor(min(8, os.cpu_count() or 1)), []
    for i, logits, from_cache in model_logits(model, config, samples, dataset, cached=cached,
                                              rows=rows, cache=cache, device=device,
                                              batch_size=batch_size,
                                              loader_workers=loader_workers):
        # Resizing, writing and scoring at native size is CPU work (clDice's skeletons, AUC's
        # sort): threads do it while the model runs the next batch (6 images/s on an H200
        # when done in line).
        pending.append(pool.submit(outputs.add, samples[i], logits.cpu(), from_cache))
        while len(pending) > 2 * batch_size or (pending and pending[0].done()):
            written.append(pending.pop(0).result())
            bar.update(1)
    for future in pending:
        written.append(future.result())
        bar.update(1)
    pool.shutdown()
    bar.close()
    written.sort(key=lambda r: r["row"])
    with (out / "predictions.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["row", "image", "mask", "view", "split",
                                                    "features", *SCORES])
        writer.writeheader()
        writer.writerows(written)
    outputs.finish()
    return written


def model_logits(model, config, samples: list, dataset, *, cached: np.ndarray,
                 rows: np.ndarray, cache: FeatureCache | None, device: torch.device,
                 batch_size: int, loader_workers: int):
    """Yields (i, logits (1, R, R) float32, from_cache) for every i of `samples`: first those
    `cached` (features read from `cache` at `rows[i]`), then the rest through the backbone.
    With the detail decoder the logits are (1, h, w), the whole image as `config.native_whole`
    sizes it, through `VesselSegmenter.infer` (tiles, mirroring as the run validated).

    `dataset(indices, with_image, native)` gives the `SegmentationSamples` items ("index" the
    position in `indices`, "copy", "view", "angles", "image" (3, R, R) uint8 when `with_image`,
    "pixels" and "box" with `native`) of those samples; `samples[i]` names sample i in errors."""
    pin = device.type == "cuda"
    native = config.native_whole if model.native else None
    for use_cache in (True, False):
        chosen = [i for i in range(len(samples)) if cached[i] == use_cache]
        if not chosen:
            continue
        subset = [samples[i] for i in chosen]
        with_image = (config.image_branch and native is None) or not use_cache
        # Whole images at their own sizes do not stack: one a batch.
        batches = DataLoader(dataset(chosen, with_image, native),
                             batch_size=1 if native is not None else batch_size,
                             collate_fn=collate_samples, num_workers=loader_workers,
                             pin_memory=pin)
        if use_cache:
            batches = FeatureBatches(batches, cache_path=cache.path, rows=rows[chosen][:, None],
                                     levels=config.cache_levels, samples=subset,
                                     pin_memory=pin)
        for batch in batches:
            with torch.no_grad():
                logits = model.infer(to_device(batch, device), live=not use_cache,
                                     tile_size=config.tile_size, mirror=config.mirror_tta)
            for j, item_logits in zip(batch["index"].tolist(), logits, strict=True):
                yield chosen[j], item_logits, use_cache


def native_prediction(logits: torch.Tensor, size: tuple[int, int]
                      ) -> tuple[np.ndarray, np.ndarray]:
    """logits (1, R, R) or (1, h, w) -> (mask (H, W) bool, probability (H, W) float32 in
    [0, 1]) at the image's own `size` (H, W): the one place a prediction is brought to native
    size."""
    full = native_logits(logits.detach().cpu(), size)
    return (full > 0).numpy(), torch.sigmoid(full).numpy()


class _Outputs:
    """What `predict` writes per row (mask PNG, scores, overlays) and at the end (report.json)."""

    def __init__(self, samples: list[Sample], out: Path, overlays: int):
        self.out, self.meter, self.scored = out, SegmentationMeter(), []
        self.mirror_tta = False  # how the logits were made, for report.json's "scoring"
        self.overlay_rows = {sample.row for sample in samples[:max(0, overlays)]}
        self.overlays: dict[int, tuple] = {}
        self._lock = threading.Lock()
        self.splits: dict[int, str] = {}  # row -> the run's split of its image
        self.by_split: dict[str, SegmentationMeter] = {}

    def add(self, sample: Sample, logits: torch.Tensor, cached: bool) -> dict:
        """logits (1, R, R) -> a 0/255 PNG at the image's own (H, W), and its scores."""
        overlay = sample.row in self.overlay_rows
        image = read_image(sample.image) if overlay or sample.mask is None else None
        # Each row is scored once: decoded here, not kept (validation keeps its masks).
        mask = read_mask(sample.mask)[0] if sample.mask is not None else None
        fov = read_mask(sample.fov)[0] if sample.mask is not None and sample.fov else None
        size = tuple(image.shape[-2:]) if mask is None else mask.shape  # equal: `check` says so
        pred, prob = native_prediction(logits, size)
        path = self.out / f"{sample.row:05d}_{sample.image.stem}_mask.png"
        Image.fromarray(pred.astype(np.uint8) * 255).save(path)
        scores = {}
        if mask is not None:
            scores = score_image(pred, mask, prob=prob, fov=fov)
        with self._lock:  # `add` runs in several threads
            if mask is not None:
                self.meter.add({k: [v] for k, v in scores.items()}, [sample.view or UNKNOWN_VIEW])
                self.by_split.setdefault(self.splits.get(sample.row, NEW),
                                         SegmentationMeter()).add(
                    {k: [v] for k, v in scores.items()}, [sample.view or UNKNOWN_VIEW])
                self.scored.append(sample)
            if overlay:
                self.overlays[sample.row] = (signed_image(image), mask, pred, sample.image.name,
                                             sample.view or UNKNOWN_VIEW, scores)
        # Absolute, as "image" is: the CSV reads the same from any folder.
        return {"row": sample.row, "image": str(sample.image), "mask": str(path.resolve()),
                "view": sample.view or "", "split": self.splits.get(sample.row, NEW),
                "features": "cached" if cached else "live",
                **{k: f"{v:.6f}" if not np.isnan(v) else "" for k, v in scores.items()}}

    def finish(self) -> None:
        """overlays/ and, when rows were scored, report.json and the console summary."""
        if self.overlays:
            parts = list(zip(*(self.overlays[row] for row in sorted(self.overlays)), strict=True))
            save_overlays(self.out / "overlays", *parts)
        if self.scored:
            summary = self.meter.summary()
            by_split = {name: meter.summary() for name, meter in sorted(self.by_split.items())}
            write_json(self.out / "report.json", {"predict": summary, "by_split": by_split,
                                                  "scoring": scoring_note(
                                                      self.scored, mirror_tta=self.mirror_tta)})
            for name, split in by_split.items():
                seen = " (images the run trained on: not held-out scores)" if (
                    name == "train") else ""
                print(f"scores of {split['n']} {name} rows with masks{seen} (each image at its "
                      f"own size):\n" + format_summary(split), flush=True)


if __name__ == "__main__":  # `python -m pipeline.predict`, as `sam3-vessel predict`
    from pipeline.cli import predict_main

    sys.exit(predict_main(prog="python -m pipeline.predict"))
