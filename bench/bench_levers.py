"""nnU-Net's inference-time levers on a trained run, each alone and together, scored as
validation scores (each image at its own size, whole image or inside its `fov`).

    python bench/bench_levers.py --run runs/chase            # the run's own manifest
    python bench/bench_levers.py --run runs/chase --no-append

Levers, each chosen on the run's *training* images and applied to its validation images (the
validation images never choose anything):
- mirror TTA: the mean of the logits of the four mirrorings (`--mirror-tta` of train/predict);
- the probability threshold: the one of 0.30, 0.35, ..., 0.70 with the best mean training Dice
  (0.5 is what the tool uses);
- removing connected components (8-connectivity) smaller than S pixels, S in 0, 10, 25, 50, 100,
  200 chosen the same way.
Deep supervision is a training-time lever and is not measured here.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import base_parser, load_average, report, table  # noqa: E402

from pipeline.data.demo import resolve_data  # noqa: E402
from pipeline.data.images import read_mask  # noqa: E402
from pipeline.data.samples import SegmentationSamples  # noqa: E402
from pipeline.predict import load_run, model_logits  # noqa: E402
from pipeline.train.metrics import score_image  # noqa: E402
from pipeline.train.scoring import native_logits  # noqa: E402

THRESHOLDS = [round(0.30 + 0.05 * i, 2) for i in range(9)]
MIN_SIZES = [0, 10, 25, 50, 100, 200]


def probabilities(model, config, samples, views, mirror: bool) -> list[np.ndarray]:
    """(H, W) float32 vessel probability of every sample at its own size."""
    config = dataclasses.replace(config, mirror_tta=mirror)

    def dataset(chosen, with_image, native):
        return SegmentationSamples([samples[i] for i in chosen], resolution=model.resolution,
                                   views=views, with_masks=False, with_image=with_image,
                                   native=native)

    out: list[np.ndarray | None] = [None] * len(samples)
    none = np.zeros(len(samples), bool)
    for i, logits, _ in model_logits(model, config, samples, dataset, cached=none,
                                     rows=np.full(len(samples), -1), cache=None,
                                     device=torch.device("cpu"), batch_size=1,
                                     loader_workers=0):
        size = read_mask(samples[i].mask)[0].shape
        out[i] = torch.sigmoid(native_logits(logits, size)).numpy()
    return out


def drop_small(pred: np.ndarray, min_size: int) -> np.ndarray:
    """`pred` without its 8-connected components of fewer than `min_size` pixels."""
    if min_size <= 0:
        return pred
    labels, count = ndimage.label(pred, structure=np.ones((3, 3), bool))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels]


def scores(probs, targets, fovs, threshold: float, min_size: int, centreline=False) -> dict:
    rows = [score_image(drop_small(p >= threshold, min_size), t, prob=p, fov=f,
                        centreline=centreline) for p, t, f in zip(probs, targets, fovs,
                                                                  strict=True)]
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--run", required=True)
    parser.add_argument("--data", default=None, help="manifest (default: the run's)")
    args = parser.parse_args()
    start_load, started = load_average(), time.perf_counter()
    torch.set_grad_enabled(False)
    model, _, config, views = load_run(Path(args.run), torch.device("cpu"))
    samples = resolve_data(args.data or config.data, config.cache_dir)
    split = {name: [s for s in samples if s.split == name] for name in ("train", "val")}
    truth = {name: ([read_mask(s.mask)[0] for s in rows],
                    [read_mask(s.fov)[0] if s.fov else None for s in rows])
             for name, rows in split.items()}
    rows_out = []
    for mirror in (False, True):
        t = time.perf_counter()
        probs = {name: probabilities(model, config, rows, views, mirror)
                 for name, rows in split.items()}
        seconds = (time.perf_counter() - t) / len(samples)
        chosen_t = max(THRESHOLDS, key=lambda th: scores(probs["train"], *truth["train"], th,
                                                         0)["dice"])
        chosen_s = max(MIN_SIZES, key=lambda s: scores(probs["train"], *truth["train"], 0.5,
                                                       s)["dice"])
        for name, th, size in (("threshold 0.5", 0.5, 0),
                               (f"threshold {chosen_t} (chosen on train)", chosen_t, 0),
                               (f"drop components < {chosen_s} px (chosen on train)", 0.5,
                                chosen_s),
                               ("both", chosen_t, chosen_s)):
            val = scores(probs["val"], *truth["val"], th, size, centreline=True)
            rows_out.append([("mirror TTA, " if mirror else "") + name, f"{val['dice']:.4f}",
                             f"{val['cldice']:.4f}", f"{val['auc']:.4f}",
                             f"{seconds:.2f}"])
            print(rows_out[-1], flush=True)
    section = table(f"Inference levers on {args.run} ({len(split['val'])} val images, chosen "
                    f"on {len(split['train'])} train images)",
                    ["lever", "val Dice", "val clDice", "val AUC", "s / image (inference)"],
                    rows_out)
    notes = [f"wall {time.perf_counter() - started:.0f} s",
             "scores as validation gives them: each image at its own size, inside its fov "
             "when the manifest has one"]
    report("bench_levers", args, start_load, [section], notes)


if __name__ == "__main__":
    main()
