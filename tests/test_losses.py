"""dice_bce_loss: zero for a confident correct prediction, falling as predictions improve."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.losses import dice_bce_loss


def _target() -> torch.Tensor:
    target = torch.zeros(2, 1, 16, 16)
    target[0, 0, 8, 2:14] = 1.0  # a 1 px line
    target[1, 0, 3:5, :] = 1.0  # a 2 px line
    return target


def test_perfect_confident_prediction_is_near_zero():
    target = _target()
    assert dice_bce_loss(30.0 * (2 * target - 1), target).item() < 1e-4


def test_empty_target_predicted_empty_is_near_zero():
    target = torch.zeros(1, 1, 8, 8)
    assert dice_bce_loss(torch.full_like(target, -30.0), target).item() < 1e-4


def test_loss_decreases_as_prediction_approaches_target():
    target = _target()
    losses = [dice_bce_loss(a * (2 * target - 1), target).item() for a in (0, 0.5, 1, 2, 4, 8)]
    assert all(a > b for a, b in zip(losses[:-1], losses[1:], strict=True)), losses


def test_parts_match_hand_computation():
    target = _target()
    # Sample 0 right, sample 1 all background: per-sample Dice 1 and 1 / (32 + 1).
    logits = torch.full_like(target, -30.0)
    logits[0] = 30.0 * (2 * target[0] - 1)
    expected_dice = (0.0 + (1 - 1 / 33)) / 2
    assert dice_bce_loss(logits, target, bce_weight=0.0).item() == pytest.approx(
        expected_dice, abs=1e-4)
    bce = F.binary_cross_entropy_with_logits(logits, target).item()
    assert dice_bce_loss(logits, target, bce_weight=2.0).item() == pytest.approx(
        expected_dice + 2 * bce, rel=1e-5)


def test_low_precision_logits_and_gradient():
    target = _target()
    logits = torch.zeros_like(target, dtype=torch.bfloat16, requires_grad=True)
    loss = dice_bce_loss(logits, target)
    assert loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(logits.grad.float()).all()
    # At logit 0 (p = 0.5) the loss pushes vessel pixels up and background down.
    assert (logits.grad[target.bool()] < 0).all() and (logits.grad[~target.bool()] > 0).all()
    assert math.isfinite(loss.item())


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        dice_bce_loss(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
