"""Training loss for vessel masks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def dice_bce_loss(logits: Tensor, target: Tensor, *, bce_weight: float = 0.5,
                  smooth: float = 1.0) -> Tensor:
    """Soft Dice loss (per sample, smoothed) plus `bce_weight` times BCE with logits.

    Vessels are thin and sparse: often under 10 % of the pixels, and a missed 1-2 px vessel
    changes few of them. BCE alone is dominated by the easy background and rewards predicting
    "no vessel" everywhere; Dice is computed over the foreground, so each image's vessels weigh
    the same however few pixels they cover. BCE keeps per-pixel gradients well behaved where the
    soft Dice is flat or noisy (empty masks, early training). Dice is taken per sample and then
    averaged, so an image with few vessels is not drowned by one with many; `smooth` (in pixels)
    makes an empty target predicted empty score a Dice of 1.

    `logits`: (B, 1, H, W) float, unbounded (any float dtype; computed in float32).
    `target`: (B, 1, H, W) float in {0, 1}, same shape.
    Returns a scalar float32 tensor >= 0; ~0 for a confident, correct prediction.
    """
    if logits.shape != target.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape"
        )
    logits = logits.float()
    target = target.float()
    probs = logits.sigmoid().flatten(1)
    flat = target.flatten(1)
    intersection = (probs * flat).sum(dim=1)
    dice = (2.0 * intersection + smooth) / (probs.sum(dim=1) + flat.sum(dim=1) + smooth)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    return (1.0 - dice).mean() + bce_weight * bce


def _soft_erode(x: Tensor) -> Tensor:
    """Soft erosion (B, 1, H, W) -> same: the minimum over a 3-px cross."""
    return torch.minimum(-F.max_pool2d(-x, (3, 1), 1, (1, 0)), -F.max_pool2d(-x, (1, 3), 1, (0, 1)))


def _soft_dilate(x: Tensor) -> Tensor:
    return F.max_pool2d(x, 3, 1, 1)


def soft_skeleton(x: Tensor, iterations: int = 10) -> Tensor:
    """Differentiable skeleton of a soft mask (Shit et al., clDice, CVPR 2021):
    (B, 1, H, W) float in [0, 1] -> same shape and range. `iterations` must exceed the
    largest vessel radius in pixels."""
    skeleton = F.relu(x - _soft_dilate(_soft_erode(x)))
    for _ in range(iterations):
        x = _soft_erode(x)
        delta = F.relu(x - _soft_dilate(_soft_erode(x)))
        skeleton = skeleton + F.relu(delta - skeleton * delta)
    return skeleton


def soft_cldice_loss(logits: Tensor, target: Tensor, *, iterations: int = 10,
                     smooth: float = 1.0) -> Tensor:
    """1 - soft clDice, per sample then averaged: the harmonic mean of the share of the
    predicted skeleton inside the target and of the target's skeleton inside the prediction.

    `logits` (B, 1, H, W) unbounded, `target` (B, 1, H, W) in {0, 1}. Scalar float32 in [0, 1].
    """
    probs, target = logits.float().sigmoid(), target.float()
    skel_pred, skel_true = soft_skeleton(probs, iterations), soft_skeleton(target, iterations)
    precision = ((skel_pred * target).flatten(1).sum(1) + smooth) / (
        skel_pred.flatten(1).sum(1) + smooth)
    sensitivity = ((skel_true * probs).flatten(1).sum(1) + smooth) / (
        skel_true.flatten(1).sum(1) + smooth)
    return (1.0 - 2.0 * precision * sensitivity / (precision + sensitivity)).mean()


CLDICE_WEIGHT = 0.5
"""Weight of the soft clDice term in `dice_bce_cldice`, as the clDice paper's alpha."""


def training_loss(name: str, logits: Tensor, target: Tensor) -> Tensor:
    """The loss `--loss name`: `dice_bce` (`dice_bce_loss`) or `dice_bce_cldice` (plus
    CLDICE_WEIGHT times `soft_cldice_loss`). Shapes as `dice_bce_loss`, except that `logits`
    may have 1 + N channels (deep supervision): the main output, then N auxiliary ones, each
    with half the weight of the one before, the weights summing to 1 (as nnU-Net)."""
    if logits.shape[1] > 1:
        weights = [0.5**i for i in range(logits.shape[1])]
        return sum(w / sum(weights) * training_loss(name, logits[:, i:i + 1], target)
                   for i, w in enumerate(weights))
    loss = dice_bce_loss(logits, target)
    if name == "dice_bce_cldice":
        loss = loss + CLDICE_WEIGHT * soft_cldice_loss(logits, target)
    elif name != "dice_bce":
        raise ValueError(f"unknown loss {name!r}")
    return loss
