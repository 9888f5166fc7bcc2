"""Segmentation scores per image, and a meter that averages them overall and per view.

The scores (`SCORES`): Dice, IoU, clDice, sensitivity, specificity, accuracy and AUC-ROC.
Each takes boolean (H, W) numpy masks (AUC: float probabilities and a boolean target) and an
optional boolean (H, W) field of view `fov`: only pixels inside it count, as the retinal papers
(DRIVE, CHASE_DB1, HRF) score; clDice skeletonises both masks cut to the FOV.

Conventions: two empty masks score Dice, IoU and clDice 1.0 (nothing to find, nothing found), one
empty and one not 0.0. Scores that divide by a count that is zero are undefined and NaN: the
sensitivity of an image without vessels, the specificity of one without background, the AUC of
an image with only one class in its FOV. Means skip NaN (and JSON writes it as null).

Every summary is a mean over images of per-image scores, AUC included (the mean per image, not
one curve over the pooled pixels of all images): the same rule for every score, exact, and
mergeable across DDP ranks as plain lists.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
from skimage.morphology import skeletonize

SCORES = ("dice", "iou", "cldice", "sensitivity", "specificity", "accuracy", "auc")
"""Every score a meter carries, in reporting order; adding one here adds it everywhere."""


def _check(pred: np.ndarray, target: np.ndarray, fov: np.ndarray | None = None):
    pred = np.asarray(pred, dtype=bool)
    target = np.asarray(target, dtype=bool)
    if pred.shape != target.shape or pred.ndim != 2:
        raise ValueError(f"expected two (H, W) masks, got {pred.shape} and {target.shape}")
    if fov is not None:
        fov = np.asarray(fov, dtype=bool)
        if fov.shape != target.shape:
            raise ValueError(f"field of view {fov.shape} and mask {target.shape} differ in shape")
    return pred, target, fov


def _cut(mask: np.ndarray, fov: np.ndarray | None) -> np.ndarray:
    return mask if fov is None else mask & fov


def confusion(pred: np.ndarray, target: np.ndarray, fov: np.ndarray | None = None
              ) -> tuple[int, int, int, int]:
    """(TP, FP, FN, TN) pixel counts of boolean (H, W) masks, inside `fov` when given."""
    pred, target, fov = _check(pred, target, fov)
    inside = pred.size if fov is None else int(fov.sum())
    pred, target = _cut(pred, fov), _cut(target, fov)
    tp = int(np.count_nonzero(pred & target))
    fp = int(np.count_nonzero(pred)) - tp
    fn = int(np.count_nonzero(target)) - tp
    return tp, fp, fn, inside - tp - fp - fn


def _ratio(numerator: int, denominator: int, empty: float) -> float:
    return numerator / denominator if denominator else empty


def _pixel_scores(counts: tuple[int, int, int, int]) -> dict[str, float]:
    tp, fp, fn, tn = counts
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, 1.0),
        "iou": _ratio(tp, tp + fp + fn, 1.0),
        "sensitivity": _ratio(tp, tp + fn, math.nan),
        "specificity": _ratio(tn, tn + fp, math.nan),
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn, math.nan),
    }


def dice(pred: np.ndarray, target: np.ndarray, fov: np.ndarray | None = None) -> float:
    """2|P ∩ T| / (|P| + |T|) for boolean (H, W) masks; 1.0 when both are empty."""
    return _pixel_scores(confusion(pred, target, fov))["dice"]


def iou(pred: np.ndarray, target: np.ndarray, fov: np.ndarray | None = None) -> float:
    """|P ∩ T| / |P ∪ T| for boolean (H, W) masks; 1.0 when both are empty."""
    return _pixel_scores(confusion(pred, target, fov))["iou"]


def sensitivity(pred: np.ndarray, target: np.ndarray, fov: np.ndarray | None = None) -> float:
    """TP / (TP + FN) (recall of vessel pixels); NaN when the target has none."""
    return _pixel_scores(confusion(pred, target, fov))["sensitivity"]


def specificity(pred: np.ndarray, target: np.ndarray, fov: np.ndarray | None = None) -> float:
    """TN / (TN + FP) (recall of background pixels); NaN when there is no background."""
    return _pixel_scores(confusion(pred, target, fov))["specificity"]


def accuracy(pred: np.ndarray, target: np.ndarray, fov: np.ndarray | None = None) -> float:
    """(TP + TN) / pixels (inside `fov`); NaN for an empty FOV."""
    return _pixel_scores(confusion(pred, target, fov))["accuracy"]


def cldice(pred: np.ndarray, target: np.ndarray, fov: np.ndarray | None = None) -> float:
    """Centreline Dice (Shit et al., CVPR 2021) for boolean (H, W) masks.

    Harmonic mean of topology precision |skel(P) ∩ T| / |skel(P)| and topology sensitivity
    |skel(T) ∩ P| / |skel(T)|. Rewards getting every vessel's centreline, however thin, rather
    than its pixels. 1.0 when both masks are empty, 0.0 when exactly one is. With `fov`, both
    masks are cut to it before skeletonising.
    """
    pred, target, fov = _check(pred, target, fov)
    pred, target = _cut(pred, fov), _cut(target, fov)
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


def auc(prob: np.ndarray, target: np.ndarray, fov: np.ndarray | None = None) -> float:
    """Area under the ROC curve of per-pixel scores `prob` (H, W) float (probabilities) against
    the boolean (H, W) `target`, over the pixels inside `fov`; NaN when one class is absent.

    Exact, ties included: the Mann-Whitney statistic, the share of (positive, negative) pixel
    pairs the positive wins, a tie counting one half, which is what
    `sklearn.metrics.roc_auc_score` returns. It sorts the negatives only and looks each positive
    up in them, faster than ranking every pixel (BENCHMARKS.md, "Timings behind the code").
    """
    prob = np.asarray(prob)
    if not np.issubdtype(prob.dtype, np.floating):
        raise TypeError(f"AUC takes probabilities (float), got dtype {prob.dtype}")
    _, target, fov = _check(np.zeros(prob.shape, bool), target, fov)
    scores, labels = (prob.ravel(), target.ravel()) if fov is None else (prob[fov], target[fov])
    positives, negatives = scores[labels], np.sort(scores[~labels])
    if positives.size == 0 or negatives.size == 0:
        return math.nan
    below = np.searchsorted(negatives, positives, side="left")  # negatives a positive beats
    ties = np.searchsorted(negatives, positives, side="right") - below
    wins = int(below.sum()) + 0.5 * int(ties.sum())
    return wins / (positives.size * negatives.size)


def score_image(pred: np.ndarray, target: np.ndarray, *, prob: np.ndarray | None = None,
                fov: np.ndarray | None = None, centreline: bool = True) -> dict[str, float]:
    """Every score in `SCORES` of one image: `pred`, `target`, `fov` (H, W) bool, `prob` (H, W)
    float probabilities for AUC (None: AUC NaN, "not computed"); clDice NaN unless
    `centreline` (its skeletons are the costly part)."""
    scores = _pixel_scores(confusion(pred, target, fov))
    scores["cldice"] = cldice(pred, target, fov) if centreline else math.nan
    scores["auc"] = auc(prob, target, fov) if prob is not None else math.nan
    return {name: scores[name] for name in SCORES}


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


def score_batch(pred, target, *, prob=None, centrelines: int | None = None
                ) -> dict[str, list[float]]:
    """Per-image scores of a batch: {name: [B] for name in SCORES}. `pred`, `target`:
    (B, H, W) bool (numpy or torch; integer 0/1 and (B, 1, H, W) also accepted); `prob`:
    (B, H, W) float probabilities for AUC, or None (AUC NaN). Only the first `centrelines`
    images (None: all) get clDice; the others' is NaN, "not computed".
    Pure: safe to run in several threads (skimage and numpy's sort release the GIL)."""
    pred, target = _as_bool_batch(pred), _as_bool_batch(target)
    if pred.shape != target.shape:
        raise ValueError(f"pred {pred.shape} and target {target.shape} differ in shape")
    if prob is not None:
        prob = np.asarray(prob.detach().cpu().numpy() if hasattr(prob, "detach") else prob)
        prob = prob.reshape(pred.shape)
    limit = len(pred) if centrelines is None else centrelines
    images = [score_image(p, t, prob=None if prob is None else prob[i], centreline=i < limit)
              for i, (p, t) in enumerate(zip(pred, target, strict=True))]
    return {name: [scores[name] for scores in images] for name in SCORES}


class SegmentationMeter:
    """Per-image scores (`SCORES`), averaged overall and per view.

    Holds plain lists, so DDP ranks can exchange `state()` (e.g. with
    `torch.distributed.all_gather_object`) and combine them with `from_state` and `merge`.
    A NaN score was not computed or is undefined (see `score_batch`); means skip it.
    """

    def __init__(self) -> None:
        self.views: list[str] = []
        self.scores: dict[str, list[float]] = {name: [] for name in SCORES}

    def __len__(self) -> int:
        return len(self.views)

    def update(self, pred, target, views: list[str], *, prob=None,
               centrelines: int | None = None) -> None:
        """Score a batch (see `score_batch`) and add it. `views`: B view labels."""
        self.add(score_batch(pred, target, prob=prob, centrelines=centrelines), views)

    def add(self, scores: dict[str, list[float]], views: list[str]) -> None:
        """Add a batch scored by `score_batch`, with its B view labels."""
        if any(len(scores[name]) != len(views) for name in SCORES):
            raise ValueError(f"{len(views)} view labels for a batch of "
                             f"{len(scores['dice'])}")
        self.views.extend(str(view) for view in views)
        for name in SCORES:
            self.scores[name].extend(scores[name])

    def summary(self) -> dict:
        """{name: mean over images (NaN when none) for name in SCORES, "n": images,
        "per_view": {view: {name: mean, ..., "n"}}} with views sorted."""
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


def format_summary(summary: dict) -> str:
    """A summary as console lines: every score overall, then one line per view."""
    def line(label: str, scores: dict) -> str:
        values = "  ".join(f"{name} -" if scores.get(name) is None or math.isnan(scores[name])
                           else f"{name} {scores[name]:.3f}" for name in SCORES)
        return f"  {label:<14} n {scores['n']:<4} {values}"

    rows = [line("all", summary)]
    rows += [line(view, scores) for view, scores in summary.get("per_view", {}).items()]
    return "\n".join(rows)
