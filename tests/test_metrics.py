"""Dice, IoU and clDice on small hand-computed masks; the per-view meter and its merging."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.metrics import SegmentationMeter, cldice, dice, iou, score_batch


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
    assert summary["per_view"] == {
        "AP": {"dice": 0.5, "iou": 0.5, "cldice": 0.5, "n": 2},
        "LAO": pytest.approx({"dice": 0.5, "iou": 1 / 3, "cldice": 0.5, "n": 1}),
    }


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
