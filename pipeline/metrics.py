"""Segmentation scores (Dice, IoU, clDice) per image, and a meter that averages them per view.

Every score takes two boolean (H, W) numpy masks and returns a float in [0, 1]; two empty masks
score 1.0 (nothing to find, nothing found), one empty and one not 0.0.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
from skimage.morphology import skeletonize

SCORES = ("dice", "iou", "cldice")


def _check(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred, dtype=bool)
    target = np.asarray(target, dtype=bool)
    if pred.shape != target.shape or pred.ndim != 2:
        raise ValueError(f"expected two (H, W) masks, got {pred.shape} and {target.shape}")
    return pred, target


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """2|P ∩ T| / (|P| + |T|) for boolean (H, W) masks; 1.0 when both are empty."""
    pred, target = _check(pred, target)
    total = int(pred.sum()) + int(target.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, target).sum()) / total


def iou(pred: np.ndarray, target: np.ndarray) -> float:
    """|P ∩ T| / |P ∪ T| for boolean (H, W) masks; 1.0 when both are empty."""
    pred, target = _check(pred, target)
    union = int(np.logical_or(pred, target).sum())
    if union == 0:
        return 1.0
    return int(np.logical_and(pred, target).sum()) / union


def cldice(pred: np.ndarray, target: np.ndarray) -> float:
    """Centreline Dice (Shit et al., CVPR 2021) for boolean (H, W) masks.

    Harmonic mean of topology precision |skel(P) ∩ T| / |skel(P)| and topology sensitivity
    |skel(T) ∩ P| / |skel(T)|. Rewards getting every vessel's centreline, however thin, rather
    than its pixels. 1.0 when both masks are empty, 0.0 when exactly one is.
    """
    pred, target = _check(pred, target)
    has_pred, has_target = bool(pred.any()), bool(target.any())
    if not (has_pred or has_target):
        return 1.0
    if not (has_pred and has_target):
        return 0.0
    skel_pred = skeletonize(pred)
    skel_target = skeletonize(target)
    tprec = _fraction_inside(skel_pred, target)
    tsens = _fraction_inside(skel_target, pred)
    if tprec + tsens == 0.0:
        return 0.0
    return 2.0 * tprec * tsens / (tprec + tsens)


def _fraction_inside(skeleton: np.ndarray, mask: np.ndarray) -> float:
    count = int(skeleton.sum())
    return int(np.logical_and(skeleton, mask).sum()) / count if count else 0.0


def _as_bool_batch(masks) -> np.ndarray:
    """(B, H, W) or (B, 1, H, W) bool/integer numpy or torch -> (B, H, W) bool numpy."""
    if hasattr(masks, "detach"):
        masks = masks.detach().cpu().numpy()
    masks = np.asarray(masks)
    if masks.dtype != bool and not np.issubdtype(masks.dtype, np.integer):
        raise TypeError(f"masks must be boolean (threshold first), got dtype {masks.dtype}")
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.ndim != 3:
        raise ValueError(f"expected masks (B, H, W), got shape {masks.shape}")
    return masks.astype(bool)


def _mean(values: list[float]) -> float:
    """Mean of the values that were computed (NaN marks one that was not); NaN if none was."""
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else math.nan


def score_batch(pred, target, *, centrelines: int | None = None) -> dict[str, list[float]]:
    """Per-image scores of a batch: {"dice": [B], "iou": [B], "cldice": [B]}. `pred`, `target`:
    (B, H, W) bool (numpy or torch; integer 0/1 and (B, 1, H, W) also accepted). Only the first
    `centrelines` images (None: all) get clDice (a skeleton of each mask: the costly part); the
    others' is NaN, "not computed".
    Pure: safe to run in several threads (skimage releases the GIL while skeletonising)."""
    pred, target = _as_bool_batch(pred), _as_bool_batch(target)
    if pred.shape != target.shape:
        raise ValueError(f"pred {pred.shape} and target {target.shape} differ in shape")
    limit = len(pred) if centrelines is None else centrelines
    return {
        "dice": [dice(p, t) for p, t in zip(pred, target, strict=True)],
        "iou": [iou(p, t) for p, t in zip(pred, target, strict=True)],
        "cldice": [cldice(p, t) if i < limit else math.nan
                   for i, (p, t) in enumerate(zip(pred, target, strict=True))],
    }


class SegmentationMeter:
    """Per-image Dice, IoU and clDice, averaged overall and per view.

    Holds plain lists, so DDP ranks can exchange `state()` (e.g. with
    `torch.distributed.all_gather_object`) and combine them with `from_state` and `merge`.
    A NaN score was not computed (see `score_batch`); means skip it.
    """

    def __init__(self) -> None:
        self.views: list[str] = []
        self.scores: dict[str, list[float]] = {name: [] for name in SCORES}

    def __len__(self) -> int:
        return len(self.views)

    def update(self, pred, target, views: list[str], *, centrelines: int | None = None) -> None:
        """Score a batch (see `score_batch`) and add it. `views`: B view labels."""
        self.add(score_batch(pred, target, centrelines=centrelines), views)

    def add(self, scores: dict[str, list[float]], views: list[str]) -> None:
        """Add a batch scored by `score_batch`, with its B view labels."""
        if any(len(scores[name]) != len(views) for name in SCORES):
            raise ValueError(f"{len(views)} view labels for a batch of "
                             f"{len(scores['dice'])}")
        self.views.extend(str(view) for view in views)
        for name in SCORES:
            self.scores[name].extend(scores[name])

    def summary(self) -> dict:
        """{"dice", "iou", "cldice": mean over images (NaN when none), "n": images,
        "per_view": {view: {"dice", "iou", "cldice", "n"}}} with views sorted."""
        by_view: dict[str, list[int]] = defaultdict(list)
        for i, view in enumerate(self.views):
            by_view[view].append(i)
        result: dict = {name: _mean(self.scores[name]) for name in SCORES}
        result["n"] = len(self.views)
        result["per_view"] = {
            view: {
                **{name: _mean([self.scores[name][i] for i in idx]) for name in SCORES},
                "n": len(idx),
            }
            for view, idx in sorted(by_view.items())
        }
        return result

    def state(self) -> dict:
        """Plain-Python copy of the per-image scores: {"views": [...], "dice": [...], ...}."""
        return {"views": list(self.views), **{name: list(self.scores[name]) for name in SCORES}}

    @classmethod
    def from_state(cls, state: dict) -> SegmentationMeter:
        meter = cls()
        lengths = {len(state["views"])} | {len(state[name]) for name in SCORES}
        if len(lengths) != 1:
            raise ValueError("meter state lists differ in length")
        meter.views = list(state["views"])
        meter.scores = {name: [float(v) for v in state[name]] for name in SCORES}
        return meter

    def merge(self, other: SegmentationMeter) -> SegmentationMeter:
        """Append `other`'s images to this meter; returns self."""
        self.views.extend(other.views)
        for name in SCORES:
            self.scores[name].extend(other.scores[name])
        return self
