"""Validation scores at the backbone's resolution against each image's own size, on a trained run.

    python bench/bench_scoring.py --run runs/chase --data chase.csv

Loads the best checkpoint of `--run`, passes the val rows of `--data` through it from the cache
it trained on (as validation does) and scores the same logits three ways:

- "backbone resolution" (validation before native scoring): logits > 0 at R x R against the
  masks area-resized to R x R (`pipeline.data.samples.resize_mask`), every pixel;
- "native, whole image": logits resized to H x W against the mask as stored, every pixel;
- "native, in the FOV": the same inside each row's `fov` (what validation reports now).

Also times, per image, what native scoring costs (`pipeline.train.scoring`): decoding a mask against
unpacking the kept bits, resizing the logits, the scores without and with clDice.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import _common as C
import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline.cache.feature_batches import FeatureBatches
from pipeline.data.checks import check_manifest
from pipeline.data.images import read_mask
from pipeline.data.manifest import UNKNOWN_VIEW, read_manifest
from pipeline.data.samples import SegmentationSamples, collate_samples, to_device
from pipeline.predict import _feature_cache, load_run
from pipeline.train.metrics import SCORES, SegmentationMeter, score_image
from pipeline.train.scoring import NativeTargets, native_logits

WAYS = ("backbone resolution", "native, whole image", "native, in the FOV")


def _logits(run: Path, data: Path):
    """(val samples, their (N, 1, R, R) logits from the run's cache, resized masks, config)."""
    model, state, config, views = load_run(run, torch.device("cpu"))
    samples = [s for s in read_manifest(data) if s.split == "val"]
    report = check_manifest(samples, require_masks=True)
    report.raise_if_errors()
    cache = _feature_cache(run, state, config)
    if cache is None:
        raise SystemExit(f"{run}: the cache it validated on is gone; extract it again")
    rows = cache.rows_for(report.keys)
    dataset = SegmentationSamples(samples, resolution=model.resolution, views=views,
                                  with_image=config.image_branch)
    loader = DataLoader(dataset, batch_size=4, collate_fn=collate_samples)
    logits, masks = [], []
    with torch.no_grad():
        for batch in FeatureBatches(loader, cache_path=cache.path, rows=rows[:, None],
                                    levels=config.levels, samples=samples, pin_memory=False):
            logits.append(model(to_device(batch, torch.device("cpu"))))
            masks.append(batch["mask"] > 0.5)
    return samples, torch.cat(logits), torch.cat(masks), config


def _scores(samples, logits, masks) -> dict[str, SegmentationMeter]:
    meters = {way: SegmentationMeter() for way in WAYS}
    labels = [s.view or UNKNOWN_VIEW for s in samples]
    meters[WAYS[0]].update(logits > 0, masks, labels, prob=torch.sigmoid(logits))
    whole = NativeTargets([replace(s, fov=None) for s in samples])
    meters[WAYS[1]].add(whole.score(logits, list(range(len(samples)))), labels)
    meters[WAYS[2]].add(NativeTargets(samples).score(logits, list(range(len(samples)))), labels)
    return meters


def _costs(samples, logits) -> list[list]:
    sample, item = samples[0], logits[0]
    targets = NativeTargets(samples[:1])
    mask, fov = targets.get(0)
    full = native_logits(item, mask.shape)
    pred, prob = (full > 0).numpy(), torch.sigmoid(full).numpy()
    rows = [
        ["decode the mask (read_mask)", C.best_time(lambda: read_mask(sample.mask))],
        ["unpack the kept mask and FOV", C.best_time(lambda: targets.get(0))],
        ["resize logits to H x W + sigmoid",
         C.best_time(lambda: torch.sigmoid(native_logits(item, mask.shape)))],
        ["all scores but clDice", C.best_time(
            lambda: score_image(pred, mask, prob=prob, fov=fov, centreline=False))],
        ["all scores", C.best_time(lambda: score_image(pred, mask, prob=prob, fov=fov))],
    ]
    return [[name, f"{1000 * seconds:.1f}"] for name, seconds in rows]


def main() -> None:
    parser = C.base_parser(__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, type=Path, help="a train_head.py run directory")
    parser.add_argument("--data", required=True, type=Path, help="its manifest (val rows used)")
    args = parser.parse_args()
    start_load = C.load_average()
    samples, logits, masks, config = _logits(args.run, args.data)
    args.backbone, args.batch_size = config.backbone, config.batch_size
    meters = _scores(samples, logits, masks)
    summaries = {way: meter.summary() for way, meter in meters.items()}
    report_file = args.run / "report.json"  # absent while the run is still training
    reported = json.loads(report_file.read_text())["val"] if report_file.is_file() else {}
    rows = [[way, *[summaries[way][name] for name in SCORES]] for way in WAYS]
    rows.append(["report.json of the run", *[reported.get(name) for name in SCORES]])
    old, new = (np.array(meters[w].scores["dice"]) for w in (WAYS[0], WAYS[2]))
    size = read_mask(samples[0].mask)[0].shape
    sections = [
        C.table(f"Val scores of one model ({len(samples)} images of {size[0]} x {size[1]}, "
                f"resolution {logits.shape[-1]})", ["scored", *SCORES], rows),
        C.table("Per-image Dice, native in the FOV minus backbone resolution",
                ["mean", "min", "max"], [[float((new - old).mean()), float((new - old).min()),
                                          float((new - old).max())]]),
        C.table("Cost of native scoring, one image (ms, best of 5)", ["step", "ms"],
                _costs(samples, logits)),
    ]
    notes = [f"run {args.run}: {json.dumps({k: reported.get(k) for k in ('epoch', 'n')})}",
             f"{sum(s.fov is not None for s in samples)} of {len(samples)} val rows have a FOV"]
    C.report("Scoring at native size", args, start_load, sections, notes)


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"{time.perf_counter() - t0:.1f} s")
