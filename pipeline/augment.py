"""Augmented copies that stay honest with a cache: each copy is a flipped or rotated image whose
features Stage A extracts like any other image, under the key `<sha256>:<name>`.

Flipping a cached feature map instead would not give the features of the flipped image (SAM 3's
trunk has absolute position embeddings and RoPE), so the head would learn from features the
backbone never produces.
"""

from __future__ import annotations

import numpy as np
import torch

AUGMENTATIONS = ("hflip", "vflip", "rot180", "rot90", "rot270")


def augmented_key(key: str, name: str) -> str:
    return f"{key}:{name}"


def copies(count: int) -> tuple[str, ...]:
    """The names of the first `count` augmentations."""
    if not 0 <= count <= len(AUGMENTATIONS):
        raise ValueError(f"--augment-copies must be between 0 and {len(AUGMENTATIONS)}")
    return AUGMENTATIONS[:count]


def apply(name: str | None, x):
    """Apply augmentation `name` (None: identity) to the last two axes of a torch tensor or
    numpy array: (..., H, W) -> (..., H', W')."""
    if name is None:
        return x
    if isinstance(x, np.ndarray):
        ops = {"hflip": lambda a: a[..., ::-1], "vflip": lambda a: a[..., ::-1, :],
               "rot90": lambda a: np.rot90(a, 1, axes=(-2, -1)),
               "rot180": lambda a: np.rot90(a, 2, axes=(-2, -1)),
               "rot270": lambda a: np.rot90(a, 3, axes=(-2, -1))}
        return np.ascontiguousarray(ops[name](x))
    ops = {"hflip": lambda t: t.flip(-1), "vflip": lambda t: t.flip(-2),
           "rot90": lambda t: torch.rot90(t, 1, (-2, -1)),
           "rot180": lambda t: torch.rot90(t, 2, (-2, -1)),
           "rot270": lambda t: torch.rot90(t, 3, (-2, -1))}
    return ops[name](x).contiguous()


def extraction_jobs(samples, keys: list[str], count: int) -> dict[str, tuple[str, str | None]]:
    """key -> (image path, augmentation or None) for every sample, plus `count` augmented
    copies of each training sample (split `train` or empty)."""
    jobs: dict[str, tuple[str, str | None]] = {}
    for sample, key in zip(samples, keys, strict=True):
        jobs.setdefault(key, (str(sample.image), None))
        if (sample.split or "train") == "train":
            for name in copies(count):
                jobs.setdefault(augmented_key(key, name), (str(sample.image), name))
    return jobs
