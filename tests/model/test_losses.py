"""dice_bce_loss: zero for a confident correct prediction, falling as predictions improve."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.model.losses import dice_bce_loss


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


def test_soft_skeleton_of_a_thick_line_is_thin_and_on_its_centre():
    from pipeline.model.losses import soft_skeleton

    mask = torch.zeros(1, 1, 21, 21)
    mask[0, 0, 8:13, 2:19] = 1.0  # 5 px thick horizontal bar
    skeleton = soft_skeleton(mask, iterations=5)
    rows = skeleton[0, 0].sum(dim=1)
    assert rows.argmax().item() == 10 and rows[10] > 3 * max(rows[8], rows[12])
    assert ((skeleton > 0) <= (mask > 0)).all()  # never outside the mask


def test_soft_cldice_rewards_connected_centrelines():
    from pipeline.model.losses import soft_cldice_loss, training_loss

    target = torch.zeros(1, 1, 16, 32)
    target[0, 0, 7:9, :] = 1.0
    broken = target.clone()
    broken[0, 0, :, 12:20] = 0.0  # the same line with a gap
    right, gapped = (soft_cldice_loss(30.0 * (2 * t - 1), target).item() for t in (target, broken))
    assert right < 0.05 < gapped
    logits = 30.0 * (2 * broken - 1)
    assert training_loss("dice_bce_cldice", logits, target).item() == pytest.approx(
        dice_bce_loss(logits, target).item() + 0.5 * gapped, rel=1e-5)
    assert training_loss("dice_bce", logits, target).item() == dice_bce_loss(logits, target).item()
    with pytest.raises(ValueError, match="unknown loss"):
        training_loss("focal", logits, target)


@pytest.mark.parametrize("name", ["dice_bce", "dice_bce_cldice"])
def test_deep_supervision_weighs_each_output_half_the_one_before(name):
    from pipeline.model.losses import training_loss

    torch.manual_seed(0)
    logits, target = torch.randn(2, 3, 16, 16), (torch.rand(2, 1, 16, 16) > 0.7).float()
    parts = [training_loss(name, logits[:, i:i + 1], target) for i in range(3)]
    expected = (4 * parts[0] + 2 * parts[1] + parts[2]) / 7
    torch.testing.assert_close(training_loss(name, logits, target), expected)
