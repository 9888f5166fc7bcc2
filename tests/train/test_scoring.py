"""Scoring at each image's own size: masks kept packed, logits resized back, FOV applied."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import roc_auc_score

from pipeline.data.manifest import Sample
from pipeline.train.metrics import SCORES, dice
from pipeline.train.scoring import NativeTargets, native_logits, score_native, scoring_note


def _write(path, array: np.ndarray) -> None:
    Image.fromarray(array.astype(np.uint8) * 255).save(path)


def _samples(tmp_path, shapes, with_fov=True) -> list[Sample]:
    rng = np.random.default_rng(0)
    samples = []
    for i, shape in enumerate(shapes):
        mask, fov = rng.random(shape) < 0.2, rng.random(shape) < 0.8
        _write(tmp_path / f"m{i}.png", mask)
        _write(tmp_path / f"f{i}.png", fov)
        samples.append(Sample(row=i + 1, image=tmp_path / f"i{i}.png", mask=tmp_path / f"m{i}.png",
                              view="v", split="val",
                              fov=tmp_path / f"f{i}.png" if with_fov else None))
    return samples


def test_targets_are_the_masks_as_stored_whatever_their_size(tmp_path):
    shapes = [(7, 13), (31, 17), (999 // 9, 960 // 9)]  # sizes that do not fill whole bytes
    targets = NativeTargets(_samples(tmp_path, shapes))
    for i, shape in enumerate(shapes):
        for _ in range(2):  # decoded the first time, unpacked the second
            mask, fov = targets.get(i)
            assert mask.dtype == bool and mask.shape == shape
            assert np.array_equal(mask, np.asarray(Image.open(tmp_path / f"m{i}.png")) > 0)
            assert np.array_equal(fov, np.asarray(Image.open(tmp_path / f"f{i}.png")) > 0)
    plain = NativeTargets(_samples(tmp_path, shapes, with_fov=False))
    assert plain.get(0)[1] is None


def test_native_scores_are_the_resized_logits_against_the_stored_mask(tmp_path):
    samples = _samples(tmp_path, [(45, 70), (60, 33)])
    targets = NativeTargets(samples)
    logits = torch.randn(2, 1, 16, 16)
    scores = targets.score(logits, [0, 1])
    assert set(scores) == set(SCORES)
    for i in range(2):
        mask, fov = targets.get(i)
        full = F.interpolate(logits[i:i + 1], size=mask.shape, mode="bilinear",
                             align_corners=False)[0, 0]
        assert torch.equal(native_logits(logits[i], mask.shape), full)
        pred = (full > 0).numpy()
        assert scores["dice"][i] == pytest.approx(dice(pred, mask, fov))
        by_hand = 2 * (pred & mask & fov).sum() / ((pred & fov).sum() + (mask & fov).sum())
        assert scores["dice"][i] == pytest.approx(by_hand)
        prob = torch.sigmoid(full).numpy()
        assert scores["auc"][i] == pytest.approx(roc_auc_score(mask[fov], prob[fov]))
        _, returned = score_native(logits[i], mask, fov)
        assert np.array_equal(returned, pred)


def test_a_row_without_a_mask_cannot_be_scored(tmp_path):
    sample = Sample(row=3, image=tmp_path / "x.png", mask=None, view=None, split="val")
    with pytest.raises(ValueError, match="row 3: .* has no mask"):
        NativeTargets([sample]).get(0)


def test_scoring_note_counts_fields_of_view(tmp_path):
    samples = _samples(tmp_path, [(5, 5)]) + _samples(tmp_path, [(5, 5)], with_fov=False)
    assert scoring_note(samples)["fov"] == "1 of 2 images scored inside their field of view"
