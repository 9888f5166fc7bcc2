"""Every score on small hand-computed masks, AUC against scikit-learn, the field of view, and the
per-view meter and its merging."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from pipeline.train.metrics import (
    SCORES,
    SegmentationMeter,
    accuracy,
    auc,
    cldice,
    confusion,
    dice,
    format_summary,
    iou,
    score_batch,
    score_image,
    sensitivity,
    specificity,
)


def _line(row: int = 5, start: int = 2, stop: int = 12, shape=(12, 20)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[row, start:stop] = True
    return mask


@pytest.mark.parametrize("score", [dice, iou, cldice])
def test_identical_and_empty(score):
    assert score(_line(), _line()) == 1.0
    empty = np.zeros((12, 20), dtype=bool)
    assert score(empty, empty) == 1.0
    assert score(empty, _line()) == 0.0
    assert score(_line(), empty) == 0.0


@pytest.mark.parametrize("score", [dice, iou, cldice])
def test_line_shifted_by_one_pixel_scores_zero(score):
    assert score(_line(row=6), _line(row=5)) == 0.0


def test_half_overlapping_lines():
    pred, target = _line(start=7, stop=17), _line(start=2, stop=12)  # 5 of 10 pixels shared
    assert dice(pred, target) == pytest.approx(0.5)
    assert iou(pred, target) == pytest.approx(5 / 15)
    # Each skeleton is its own line: tprec = tsens = 5 / 10.
    assert cldice(pred, target) == pytest.approx(0.5)


def test_cldice_rewards_the_centreline_of_a_thick_vessel():
    thick = np.zeros((12, 20), dtype=bool)
    thick[4:7, 2:12] = True
    centre = _line(row=5, start=2, stop=12)
    assert dice(centre, thick) == pytest.approx(0.5)  # 2 * 10 / (10 + 30)
    assert cldice(centre, thick) > 0.85  # tprec 1; tsens: nearly all of skel(thick) is on row 5
    assert cldice(thick, thick) == 1.0


def test_shape_checked():
    with pytest.raises(ValueError):
        dice(np.zeros((4, 4), bool), np.zeros((4, 5), bool))


def _batch():
    good, shifted = _line(), _line(row=6)
    pred = np.stack([good, shifted, good])
    target = np.stack([good, good, _line(start=7, stop=17)])
    return pred, target, ["AP", "AP", "LAO"]


def test_meter_overall_and_per_view_means():
    meter = SegmentationMeter()
    pred, target, views = _batch()
    meter.update(pred, target, views)
    summary = meter.summary()
    assert summary["n"] == 3
    assert summary["dice"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert summary["iou"] == pytest.approx((1 + 0 + 1 / 3) / 3)
    assert summary["cldice"] == pytest.approx((1 + 0 + 0.5) / 3)
    # Confusion counts (TP, FP, FN, TN) of the 240-pixel images: (10, 0, 0, 230), (0, 10, 10,
    # 220), (5, 5, 5, 225).
    assert summary["sensitivity"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert summary["specificity"] == pytest.approx((1 + 220 / 230 + 225 / 230) / 3)
    assert summary["accuracy"] == pytest.approx((1 + 220 / 240 + 230 / 240) / 3)
    assert math.isnan(summary["auc"])  # no probabilities given
    ap, lao = summary["per_view"]["AP"], summary["per_view"]["LAO"]
    assert {k: ap[k] for k in ("dice", "iou", "cldice", "sensitivity", "n")} == {
        "dice": 0.5, "iou": 0.5, "cldice": 0.5, "sensitivity": 0.5, "n": 2}
    assert ap["specificity"] == pytest.approx((1 + 220 / 230) / 2)
    assert ap["accuracy"] == pytest.approx((1 + 220 / 240) / 2)
    assert {k: lao[k] for k in SCORES if k != "auc"} == pytest.approx({
        "dice": 0.5, "iou": 1 / 3, "cldice": 0.5, "sensitivity": 0.5,
        "specificity": 225 / 230, "accuracy": 230 / 240})
    assert set(summary) == {*SCORES, "n", "per_view"} and set(lao) == {*SCORES, "n"}


def test_meter_accepts_torch_and_channel_axis_but_not_probabilities():
    pred, target, views = _batch()
    meter = SegmentationMeter()
    meter.update(torch.from_numpy(pred)[:, None], torch.from_numpy(target).to(torch.uint8), views)
    assert meter.summary()["dice"] == pytest.approx(0.5)
    with pytest.raises(TypeError, match="boolean"):
        meter.update(pred.astype(np.float32), target, views)
    with pytest.raises(ValueError, match="view"):
        meter.update(pred, target, views[:2])


def test_meter_merge_and_state_round_trip():
    pred, target, views = _batch()
    whole, first, second = SegmentationMeter(), SegmentationMeter(), SegmentationMeter()
    whole.update(pred, target, views)
    first.update(pred[:1], target[:1], views[:1])
    second.update(pred[1:], target[1:], views[1:])
    restored = SegmentationMeter.from_state(second.state())
    assert first.merge(restored).summary() == whole.summary()
    assert len(first) == 3


def test_empty_meter_summary():
    summary = SegmentationMeter().summary()
    assert summary["n"] == 0 and summary["per_view"] == {}
    assert math.isnan(summary["dice"])


def test_batches_scored_without_centrelines_count_for_dice_but_not_cldice():
    pred, target, views = _batch()
    meter = SegmentationMeter()
    meter.update(pred[:1], target[:1], views[:1])  # identical: every score 1
    meter.add(score_batch(pred[1:], target[1:], centrelines=0), views[1:])
    summary = meter.summary()
    assert summary["n"] == 3 and summary["dice"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert summary["cldice"] == 1.0  # only the image whose skeleton was computed
    assert summary["per_view"]["LAO"]["n"] == 1 and math.isnan(summary["per_view"]["LAO"]["cldice"])
    state = SegmentationMeter.from_state(meter.state()).summary()
    assert state["cldice"] == 1.0 and math.isnan(state["per_view"]["LAO"]["cldice"])


def test_centrelines_scores_exactly_the_first_images():
    pred, target, _ = _batch()
    scores = score_batch(pred, target, centrelines=2)
    assert [math.isnan(v) for v in scores["cldice"]] == [False, False, True]
    assert scores["cldice"][:2] == score_batch(pred, target)["cldice"][:2]
    assert not any(math.isnan(v) for v in scores["dice"] + scores["iou"])


def _tiny():
    """A 3 x 4 prediction and truth: TP 2, FP 1, FN 2, TN 7."""
    pred = np.array([[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]], bool)
    target = np.array([[1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 1]], bool)
    return pred, target


def test_pixel_scores_by_hand():
    pred, target = _tiny()
    assert confusion(pred, target) == (2, 1, 2, 7)
    assert dice(pred, target) == pytest.approx(4 / 7)  # 2 TP / (2 TP + FP + FN)
    assert iou(pred, target) == pytest.approx(2 / 5)
    assert sensitivity(pred, target) == pytest.approx(2 / 4)
    assert specificity(pred, target) == pytest.approx(7 / 8)
    assert accuracy(pred, target) == pytest.approx(9 / 12)


def test_field_of_view_restricts_every_score_by_hand():
    pred, target = _tiny()
    fov = np.ones((3, 4), bool)
    fov[:, 3] = False  # drops the FN at (2, 3) and two TN
    fov[0, 1] = False  # drops the FP at (0, 1)
    assert confusion(pred, target, fov) == (2, 0, 1, 5)
    assert dice(pred, target, fov) == pytest.approx(4 / 5)
    assert iou(pred, target, fov) == pytest.approx(2 / 3)
    assert sensitivity(pred, target, fov) == pytest.approx(2 / 3)
    assert specificity(pred, target, fov) == 1.0
    assert accuracy(pred, target, fov) == pytest.approx(7 / 8)
    # The pixels outside the FOV (probabilities 0.95, 0.0, 0.0 and 1.0) no longer count.
    prob = np.array([[0.9, 0.95, 0.2, 0.0], [0.1, 0.8, 0.3, 0.0], [0.1, 0.1, 0.4, 1.0]])
    assert auc(prob, target) == pytest.approx(roc_auc_score(target.ravel(), prob.ravel()))
    # Inside: positives 0.9, 0.8, 0.3; negatives 0.2, 0.1, 0.1, 0.1, 0.4: 14 of 15 pairs won.
    assert auc(prob, target, fov) == pytest.approx(14 / 15)
    whole = score_image(pred, target, prob=prob)
    inside = score_image(pred, target, prob=prob, fov=fov)
    assert all(whole[k] != inside[k] for k in ("dice", "sensitivity", "specificity", "auc"))


def test_cldice_is_cut_to_the_field_of_view():
    pred, target = _line(start=2, stop=12), _line(start=2, stop=18)
    fov = np.zeros((12, 20), bool)
    fov[:, :12] = True  # the target's extra length lies outside
    assert cldice(pred, target) < 0.9
    assert cldice(pred, target, fov) == 1.0


def test_undefined_scores_are_nan_and_skipped_in_means():
    empty, line = np.zeros((12, 20), bool), _line()
    assert math.isnan(sensitivity(line, empty))  # no vessel to find
    assert math.isnan(specificity(line, np.ones((12, 20), bool)))  # no background
    assert math.isnan(auc(np.full((12, 20), 0.5), empty))  # one class only
    meter = SegmentationMeter()
    meter.update(np.stack([line, line]), np.stack([line, empty]), ["a", "a"],
                 prob=np.stack([line, line]).astype(np.float32))
    summary = meter.summary()
    assert summary["sensitivity"] == 1.0 and summary["auc"] == 1.0
    assert summary["specificity"] == pytest.approx((1 + 230 / 240) / 2)


def test_auc_by_hand_with_ties():
    target = np.array([[1, 0, 0, 1]], bool)
    assert auc(np.array([[0.5, 0.5, 0.2, 0.9]]), target) == pytest.approx(3.5 / 4)
    assert auc(np.array([[0.9, 0.1, 0.2, 0.8]]), target) == 1.0
    assert auc(np.array([[0.1, 0.9, 0.8, 0.2]]), target) == 0.0
    assert auc(np.full((1, 4), 0.3), target) == 0.5
    with pytest.raises(TypeError, match="probabilities"):
        auc(target, target)


@pytest.mark.parametrize("levels", [2, 5, 17, 10_000])
def test_auc_matches_scikit_learn(levels):
    rng = np.random.default_rng(levels)
    target = rng.random((37, 53)) < 0.2
    # Few levels: many ties; probabilities correlated with the target, as a model's are.
    prob = np.clip(target * 0.3 + rng.random((37, 53)), 0, 1)
    prob = (np.round(prob * (levels - 1)) / (levels - 1)).astype(np.float32)
    fov = rng.random((37, 53)) < 0.7
    assert auc(prob, target) == pytest.approx(roc_auc_score(target.ravel(), prob.ravel()),
                                              abs=1e-12)
    assert auc(prob, target, fov) == pytest.approx(
        roc_auc_score(target[fov], prob[fov]), abs=1e-12)


def test_score_batch_takes_probabilities_for_auc():
    pred, target, views = _batch()
    prob = np.where(pred, 0.9, 0.1).astype(np.float32)
    scores = score_batch(torch.from_numpy(pred), target, prob=torch.from_numpy(prob))
    assert set(scores) == set(SCORES)
    expected = [roc_auc_score(t.ravel(), p.ravel()) for t, p in zip(target, prob, strict=True)]
    assert scores["auc"] == pytest.approx(expected)
    assert scores["dice"] == score_batch(pred, target)["dice"]


def test_format_summary_prints_every_score_overall_and_per_view():
    pred, target, views = _batch()
    meter = SegmentationMeter()
    meter.update(pred, target, views)
    lines = format_summary(meter.summary()).splitlines()
    assert len(lines) == 3 and lines[0].split()[0] == "all"
    assert [line.split()[0] for line in lines[1:]] == ["AP", "LAO"]
    for name in SCORES:
        assert all(f" {name} " in line for line in lines)
    assert "auc -" in lines[0] and "dice 0.500" in lines[0]
