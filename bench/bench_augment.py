"""Augmented copies: what one costs (transform, extraction, disk) and the Dice K copies buy.

    python bench/bench_augment.py --data chase.csv --copies 8 --steps 400 --seeds 0,1

`--data` is a manifest of real images with masks (train and val rows). Cost: the CPU time of
one copy's transform (image and mask, one thread, at the images' own size), Stage A from an
empty cache with and without `--copies K` (`pipeline.extraction.run_extraction`, the real
path: the difference over the copies is the marginal seconds per copy), the bytes each cache
row takes on disk, and those of the sam3 preset computed from its level shapes. Dice: the real
training loop (`pipeline.train.launch.train`, one process) from the cache with `--lr`, batch
`--batch-size`, no end-to-end epochs, as many epochs as make `--steps` optimizer steps, once
per K in `0,K` and seed; the best epoch's validation scores from report.json.
"""

from __future__ import annotations

import json
import math
import shutil
import time

import _common as C
import numpy as np
import torch

from pipeline.config import ExtractConfig, TrainConfig
from pipeline.data.augment import CopyPlan, transform_image, transform_mask
from pipeline.data.images import read_image, read_mask
from pipeline.data.manifest import read_manifest, sample_keys
from pipeline.extraction import run_extraction
from pipeline.model.backbone import PRESETS


def parse_args(argv=None):
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="manifest CSV of real images with masks")
    parser.add_argument("--copies", type=int, default=8, help="K compared against 0")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps per run (0: "
                        "cost only)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", default="0", help="training seeds, comma-separated")
    parser.set_defaults(batch_size=4)
    args = C.finish_args(parser.parse_args(argv), needs_weights=False)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    return args


def transform_seconds(samples, keys) -> tuple[float, float, tuple[int, int]]:
    """(best s of decoding image and mask, best s of one copy's transform of both), one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    sample, names = samples[0], CopyPlan("random", 4).names(keys[0])
    image, mask = read_image(sample.image), read_mask(sample.mask)[0]
    decode = C.best_time(lambda: (read_image(sample.image), read_mask(sample.mask)))
    copy = min(C.best_time(lambda n=n: (transform_image(n, image), transform_mask(n, mask)))
               for n in names)
    torch.set_num_threads(threads)
    return decode, copy, tuple(image.shape[-2:])


def extraction_rows(args, samples, keys) -> list[list]:
    """Stage A from an empty cache with 0 and K copies: [[K, images, seconds, s per image]]."""
    rows = []
    for copies in (0, args.copies):
        folder = args.work_dir / f"augment-extract-{copies}"
        best = math.inf
        for _ in range(2):
            shutil.rmtree(folder, ignore_errors=True)
            config = ExtractConfig(data=args.data, backbone=args.backbone, device=args.device,
                                   cache_dir=str(folder), augment_copies=copies, amp=args.amp)
            with C.Others() as others:
                summary = run_extraction(config, samples, keys)
            best = min(best, summary.seconds)
        rows.append([copies, summary.extracted, best, best / summary.extracted,
                     C.share(others.share)])
    return rows


def disk_rows(args, samples, keys) -> list[list]:
    """Bytes per cache row: measured for --backbone, computed (float16, uncompressed) for sam3."""
    folder = args.work_dir / f"augment-extract-{args.copies}"
    cache = next(folder.glob("*.zarr"))
    n = sum(1 for _ in (cache / "features" / "1x" / "c").iterdir())  # one folder per row
    measured = sum(f.stat().st_size for f in (cache / "features").rglob("*")
                   if f.is_file() and f.name != "zarr.json") / n
    rows = [[args.backbone, "1x", f"{measured / 1e6:.3f} MB (measured)"]]
    for levels in (("1x",), ("1x", "2x"), ("1x", "2x", "4x")):
        size = sum(2 * int(np.prod(PRESETS["sam3"].level_shape(lvl))) for lvl in levels)
        rows.append(["sam3", ",".join(levels), f"{size / 1e6:.2f} MB (computed)"])
    return rows


def train_rows(args) -> list[list]:
    """One run per K in (0, K) and seed: best-epoch val Dice, clDice, IoU; minutes."""
    samples = read_manifest(args.data)
    n_train = sum((s.split or "train") == "train" for s in samples)
    per_epoch = math.ceil(n_train / args.batch_size)
    epochs = max(1, round(args.steps / per_epoch))
    rows = []
    for copies in (0, args.copies):
        for seed in args.seeds:
            run = args.work_dir / f"augment-run-k{copies}-s{seed}"
            shutil.rmtree(run, ignore_errors=True)
            config = TrainConfig(
                data=args.data, backbone=args.backbone, device=args.device, amp=args.amp,
                cache_dir=str(args.work_dir / f"augment-extract-{args.copies}"),
                run_dir=str(run), extract_missing=True, augment_copies=copies, lr=args.lr,
                batch_size=args.batch_size, epochs=epochs, e2e_every=0, seed=seed, overlays=0)
            from pipeline.train.launch import train

            start = time.perf_counter()
            with C.Others() as others:
                train(config)
            minutes = (time.perf_counter() - start) / 60
            val = json.loads((run / "report.json").read_text())["val"]
            last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            last_train = [r for r in last if r["split"] == "train"][-1]
            rows.append([copies, seed, epochs * per_epoch, val["dice"], val.get("cldice"),
                         val["iou"], val.get("epoch"), last_train["dice"], minutes,
                         C.share(others.share)])
            print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    start_load = C.load_average()
    samples = read_manifest(args.data)
    keys = sample_keys(samples)
    train_samples = [s for s in samples if (s.split or "train") == "train"]
    decode, copy, size = transform_seconds(train_samples, sample_keys(train_samples))
    sections = [C.table("Cost of one random copy", ["what", "value"], [
        ["image size (H x W)", f"{size[0]} x {size[1]}"],
        ["decode image + mask, one thread", f"{1000 * decode:.1f} ms"],
        ["transform image + mask (one copy), one thread", f"{1000 * copy:.1f} ms"],
    ])]
    extraction = extraction_rows(args, samples, keys)
    (_, n0, t0, _, _), (_, nk, tk, _, _) = extraction
    sections.append(C.table(
        "Stage A from an empty cache, best of 2", ["copies K", "images extracted", "seconds",
                                                   "s per image", "others' CPU share"],
        extraction))
    sections.append(f"Marginal Stage A time per copy: {(tk - t0) / (nk - n0):.3f} s "
                    f"(the originals: {t0 / n0:.3f} s per image, start-up included)\n")
    sections.append(C.table("Disk per cache row (one copy)", ["backbone", "levels", "bytes"],
                            disk_rows(args, samples, keys)))
    if args.steps:
        sections.append(C.table(
            f"Validation Dice bought by K copies (lr {args.lr}, batch {args.batch_size}, "
            "--e2e-every 0; best epoch)",
            ["K", "seed", "steps", "val Dice", "val clDice", "val IoU", "best epoch",
             "last train Dice", "minutes", "others' CPU share"], train_rows(args)))
    C.report("bench_augment", args, start_load, sections, [
        "Copies are transformed at the image's own size in the decode processes of both "
        "stages; the forward pass of a copy costs what an original's does.",
        "Stage A times include building the model and the DataLoader once per run."])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
