"""Whole-image inference of the detail decoder: one piece or overlapping tiles, with optional
mirror test-time augmentation. Validation and `predict` both run it (one implementation).

The features are computed once per image (cached or live); each tile samples its own region of
them through its box, so a tile sees exactly what the same pixels see in a whole-image pass, up
to the U-Net's border effects, which the blending weights (highest at a tile's centre, never
zero) keep small. Mirroring flips the pixels and reverses the box, so the sampled features flip
with them; the logits are flipped back before averaging.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

MIRRORS = ((), (-1,), (-2,), (-2, -1))
"""The flips of mirror TTA: none, horizontal, vertical, both (nnU-Net's 2-D mirroring)."""


def mirrored_boxes(boxes: Tensor, dims: tuple[int, ...]) -> Tensor:
    """(B, 4) boxes x0, y0, x1, y1 with the x (dim -1) and/or y (dim -2) edges swapped."""
    boxes = boxes.clone()
    if -1 in dims:
        boxes[:, [0, 2]] = boxes[:, [2, 0]]
    if -2 in dims:
        boxes[:, [1, 3]] = boxes[:, [3, 1]]
    return boxes


def tile_starts(length: int, tile: int, overlap: float = 0.25) -> list[int]:
    """Starts of tiles of `tile` pixels covering `length`, overlapping by about `overlap`; one
    tile of the whole length when it fits."""
    if length <= tile:
        return [0]
    stride = max(1, int(tile * (1 - overlap)))
    starts = list(range(0, length - tile, stride)) + [length - tile]
    return sorted(set(starts))


def blend_weights(h: int, w: int, device) -> Tensor:
    """(h, w) float32 weights, 1 at the centre falling linearly to 0.1 at the edges."""
    def ramp(n: int) -> Tensor:
        t = (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n
        return 1 - 0.9 * (2 * t - 1).abs()
    return ramp(h)[:, None] * ramp(w)[None, :]


def sub_boxes(boxes: Tensor, y0: int, x0: int, h: int, w: int, height: int, width: int
              ) -> Tensor:
    """The boxes of the pixel region [y0:y0+h, x0:x0+w] of an image of (height, width) whose
    whole lies at `boxes` (B, 4)."""
    bx0, by0, bx1, by1 = boxes.unbind(-1)
    sx, sy = (bx1 - bx0) / width, (by1 - by0) / height
    return torch.stack([bx0 + sx * x0, by0 + sy * y0, bx0 + sx * (x0 + w),
                        by0 + sy * (y0 + h)], dim=-1)


def infer_logits(decode: Callable[[Tensor, Tensor], Tensor], image: Tensor, boxes: Tensor, *,
                 tile_size: int = 0, mirror: bool = False) -> Tensor:
    """Logits (B, 1, H, W) float32 of `image` (B, 3, H, W) float in [-1, 1].

    `decode(pixels (B, 3, h, w), boxes (B, 4)) -> (B, 1, h, w)` runs the decoder on a piece with
    its box; `boxes` (B, 4) is where the whole image lies. `tile_size` > 0 and smaller than a side:
    overlapping tiles blended by `blend_weights`; `mirror`: the mean over `MIRRORS`.
    """
    height, width = image.shape[-2:]
    total = torch.zeros(image.shape[0], 1, height, width, device=image.device)
    weight = torch.zeros(1, 1, height, width, device=image.device)
    th = tile_size if 0 < tile_size < height else height
    tw = tile_size if 0 < tile_size < width else width
    ramp = blend_weights(th, tw, image.device)[None, None]
    for y0 in tile_starts(height, th):
        for x0 in tile_starts(width, tw):
            piece = image[..., y0:y0 + th, x0:x0 + tw]
            box = sub_boxes(boxes, y0, x0, th, tw, height, width)
            logits = mirrored_mean(decode, piece, box) if mirror else decode(piece, box).float()
            total[..., y0:y0 + th, x0:x0 + tw] += logits * ramp
            weight[..., y0:y0 + th, x0:x0 + tw] += ramp
    return total / weight


def mirrored_mean(decode: Callable[[Tensor, Tensor], Tensor], image: Tensor, boxes: Tensor
                  ) -> Tensor:
    """The mean over `MIRRORS` of decode(flipped image, mirrored boxes), flipped back."""
    total = None
    for dims in MIRRORS:
        pixels = image.flip(dims) if dims else image
        logits = decode(pixels, mirrored_boxes(boxes, dims)).float()
        logits = logits.flip(dims) if dims else logits
        total = logits if total is None else total + logits
    return total / len(MIRRORS)
