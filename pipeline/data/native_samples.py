"""Samples at the image's own resolution for the detail decoder: whole images (validation,
`predict`) or random crops (training), each with the box that says where it lies in the image.

The pixels are the image as stored, made 8-bit as `sam3_resize` does and shrunk (antialiased)
only when its longer side exceeds `max_side`; masks follow the same geometry. A training crop
of `crop` x `crop` pixels is cut at a random place drawn from (seed, epoch, sample); an image
smaller than the crop is padded with zeros (image and mask), its box then reaching past the
image's edge so the features sampled there stay aligned.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

WHOLE_BOX = (0.0, 0.0, 1.0, 1.0)
"""The box of a whole image: x0, y0, x1, y1 as fractions of its width and height."""


@dataclass(frozen=True)
class NativeSampling:
    """How the detail decoder sees a sample: `crop` x `crop` random crops (None: the whole
    image), after shrinking images whose longer side exceeds `max_side` (0: never)."""

    crop: int | None = None
    max_side: int = 0

    def size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of an (height, width) image for the detail decoder."""
        longest = max(height, width)
        if not self.max_side or longest <= self.max_side:
            return height, width
        scale = self.max_side / longest
        return max(1, round(height * scale)), max(1, round(width * scale))


def native_pixels(image: torch.Tensor, sampling: NativeSampling) -> torch.Tensor:
    """(3, H, W) uint8 or uint16 as `read_image` gives it -> (3, h, w) uint8 (`sampling.size`)."""
    pixels = v2.functional.to_dtype(image, torch.uint8, scale=True)
    size = sampling.size(*pixels.shape[-2:])
    if size != tuple(pixels.shape[-2:]):
        pixels = v2.functional.resize(pixels, list(size), antialias=True)
    return pixels.contiguous()


def native_mask(mask: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """(H, W) bool -> (h, w) uint8 in {0, 1} at `size` (area average, then >= 0.5)."""
    tensor = torch.from_numpy(np.ascontiguousarray(mask)).to(torch.uint8)
    if tuple(mask.shape) == tuple(size):
        return tensor
    resized = F.interpolate(tensor[None, None].float(), size=tuple(size), mode="area")
    return (resized[0, 0] >= 0.5).to(torch.uint8)


def crop_box(height: int, width: int, crop: int, rng: np.random.Generator
             ) -> tuple[int, int, torch.Tensor]:
    """A random crop of an (height, width) image: (y0, x0, box (4,) float32). Along a side
    shorter than `crop` the crop starts at 0 and the box reaches past the edge."""
    y0 = int(rng.integers(0, height - crop + 1)) if height > crop else 0
    x0 = int(rng.integers(0, width - crop + 1)) if width > crop else 0
    box = torch.tensor([x0 / width, y0 / height, (x0 + crop) / width, (y0 + crop) / height],
                       dtype=torch.float32)
    return y0, x0, box


def cut(array: torch.Tensor, y0: int, x0: int, crop: int) -> torch.Tensor:
    """(..., h, w) -> (..., crop, crop) from (y0, x0), zero-padded past the edge."""
    piece = array[..., y0:y0 + crop, x0:x0 + crop]
    pad_h, pad_w = crop - piece.shape[-2], crop - piece.shape[-1]
    if pad_h or pad_w:
        piece = F.pad(piece, (0, pad_w, 0, pad_h))
    return piece.contiguous()


def native_item(pixels: torch.Tensor, mask: torch.Tensor | None, sampling: NativeSampling,
                rng: np.random.Generator | None) -> dict:
    """{"pixels": (3, c, c) uint8, "mask": (1, c, c) float32 {0, 1} (when `mask`), "box": (4,)}
    for a crop (`sampling.crop`, drawn with `rng`), or the whole (3, h, w) image."""
    height, width = pixels.shape[-2:]
    if sampling.crop is None:
        item = {"pixels": pixels, "box": torch.tensor(WHOLE_BOX)}
        if mask is not None:
            item["mask"] = mask[None].float()
        return item
    y0, x0, box = crop_box(height, width, sampling.crop, rng)
    item = {"pixels": cut(pixels, y0, x0, sampling.crop), "box": box}
    if mask is not None:
        item["mask"] = cut(mask, y0, x0, sampling.crop)[None].float()
    return item
