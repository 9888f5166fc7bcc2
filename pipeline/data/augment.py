"""Augmented copies that stay honest with a cache: each copy is a transformed image whose
features Stage A extracts like any other image, under the key `<sha256>:<name>`.

Transforming a cached feature map instead would not give the features of the transformed image
(SAM 3's trunk has absolute position embeddings and RoPE), so the head would learn from features
the backbone never produces.

Two families of copies (`--augment`):

- `random` (default): copy c of an image is a transform drawn from the `aug-v1` distribution by
  a generator seeded with (`--augment-seed`, c, the image's key). Its name spells out every
  parameter (`aug-v1:h1,v0,r-12.5,s1.104,x0.031,y-0.020,b0.052,c1.107,g0.953,n0.012,z123`), so
  the key alone determines the transformed image: both stages derive the same keys from
  (image key, copy index, seed), and anything holding a key can recompute its pixels.
- `flips`: the five fixed flips and rotations `hflip, vflip, rot180, rot90, rot270` (K <= 5),
  exact (no interpolation), under the key `<sha256>:hflip` etc.

A random transform: geometry first (flips, rotation, scale, shift, about the image centre; zero
outside the image), applied to the image bilinearly and to the mask bilinearly then thresholded
at 0.5; then, on the image only: contrast (about the image's mean), brightness, gamma and
Gaussian noise. Everything runs at the image's own size, before SAM 3's resize.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where a copy is made: configs read this module without it
    import torch

VERSION = "aug-v1"
"""Names the distribution and the code applying it; part of every random copy's key."""
FAMILIES = ("random", "flips")
FLIPS = ("hflip", "vflip", "rot180", "rot90", "rot270")
MAX_COPIES = 32
"""Copies per training image at most: each costs one extraction and one cache row."""
AUTO_ROWS, AUTO_MAX_COPIES = 500, 4
"""Without --augment-copies: copies until the training set holds AUTO_ROWS rows, at most
AUTO_MAX_COPIES an image (`auto_copies`)."""


def auto_copies(train_images: int) -> int:
    """Random copies per training image when --augment-copies is not given:
    min(AUTO_MAX_COPIES, ceil(AUTO_ROWS / train_images) - 1), never below 0.

    4 for sets up to 100 training images (CHASE_DB1, DRIVE, HRF, most angiography sets), fewer
    above, none from 500 on: the copies pay where a small set overfits (BENCHMARKS.md, "Training
    recipe"), and a large set would pay their extraction and disk for little.
    """
    if train_images <= 0:
        return 0
    return max(0, min(AUTO_MAX_COPIES, -(-AUTO_ROWS // train_images) - 1))


@dataclass(frozen=True)
class RandomTransform:
    """One draw of `aug-v1`. Geometry: flips, then rotation by `angle` degrees and zoom by
    `scale` about the centre, then a shift by (`shift_x`, `shift_y`) of the width and height.
    Photometry on [0, 1] intensities: (x - mean) * contrast + mean + brightness, clamped, then
    x ** gamma, then + noise * N(0, 1) from a generator seeded with `noise_seed`, clamped."""

    hflip: bool
    vflip: bool
    angle: float
    scale: float
    shift_x: float
    shift_y: float
    brightness: float
    contrast: float
    gamma: float
    noise: float
    noise_seed: int

    # Per field: the letter in the name and its format; values are rounded through the name, so
    # parsing a name gives back exactly the transform that was applied.
    _CODES = {"hflip": ("h", "d"), "vflip": ("v", "d"), "angle": ("r", ".1f"),
              "scale": ("s", ".3f"), "shift_x": ("x", ".3f"), "shift_y": ("y", ".3f"),
              "brightness": ("b", ".3f"), "contrast": ("c", ".3f"), "gamma": ("g", ".3f"),
              "noise": ("n", ".3f"), "noise_seed": ("z", "d")}

    @classmethod
    def draw(cls, rng: np.random.Generator) -> RandomTransform:
        """A draw of the `aug-v1` distribution (rounded as its name spells it)."""
        def log_uniform(low, high):
            return math.exp(rng.uniform(math.log(low), math.log(high)))

        drawn = cls(hflip=bool(rng.random() < 0.5), vflip=bool(rng.random() < 0.5),
                    angle=rng.uniform(-30, 30), scale=log_uniform(0.8, 1.25),
                    shift_x=rng.uniform(-0.05, 0.05), shift_y=rng.uniform(-0.05, 0.05),
                    brightness=rng.uniform(-0.1, 0.1), contrast=log_uniform(0.75, 1.33),
                    gamma=log_uniform(0.75, 1.33),
                    noise=rng.uniform(0, 0.05) if rng.random() < 0.5 else 0.0,
                    noise_seed=int(rng.integers(2**31)))
        return cls.parse(drawn.name())

    def name(self) -> str:
        parts = [f"{code}{getattr(self, f.name):{fmt}}"
                 for f in fields(self) for code, fmt in [self._CODES[f.name]]]
        return f"{VERSION}:{','.join(parts)}"

    @classmethod
    def parse(cls, name: str) -> RandomTransform:
        version, _, body = name.partition(":")
        parts = body.split(",")
        if version != VERSION or len(parts) != len(cls._CODES):
            raise ValueError(f"not an {VERSION} transform: {name!r}")
        values = {}
        for f, part in zip(fields(cls), parts, strict=True):
            code, fmt = cls._CODES[f.name]
            if part[:1] != code:
                raise ValueError(f"not an {VERSION} transform: {name!r}")
            values[f.name] = int(part[1:]) if fmt == "d" else float(part[1:])
        values["hflip"], values["vflip"] = bool(values["hflip"]), bool(values["vflip"])
        return cls(**values)

    def affine(self, height: int, width: int) -> torch.Tensor:
        """(1, 2, 3) float64 `affine_grid` matrix: output coordinates -> input coordinates, in
        the normalised [-1, 1] units of `grid_sample(align_corners=False)`. Worked in pixels
        (so rotation does not shear non-square images): out = S (F . s R(angle) . in) + d."""
        a = math.radians(self.angle)
        forward = self.scale * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        forward = np.diag([-1.0 if self.hflip else 1.0, -1.0 if self.vflip else 1.0]) @ forward
        inverse = np.linalg.inv(forward)
        half = np.diag([width / 2, height / 2])  # normalised -> centred pixel units
        shift = np.array([self.shift_x * width, self.shift_y * height])
        linear = np.linalg.inv(half) @ inverse @ half
        offset = -np.linalg.inv(half) @ inverse @ shift
        import torch

        return torch.from_numpy(np.concatenate([linear, offset[:, None]], axis=1))[None]

    def warp(self, x: torch.Tensor) -> torch.Tensor:
        """(C, H, W) float32 -> (C, H, W) float32, bilinear, zero outside the image."""
        import torch.nn.functional as F

        height, width = x.shape[-2:]
        grid = F.affine_grid(self.affine(height, width).float(), [1, x.shape[0], height, width],
                             align_corners=False)
        return F.grid_sample(x[None], grid, mode="bilinear", padding_mode="zeros",
                             align_corners=False)[0]

    def image(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) uint8 or uint16 -> the transformed image, same shape and dtype."""
        import torch

        top = float(torch.iinfo(image.dtype).max)
        x = self.warp(image.float() / top)
        x = ((x - x.mean()) * self.contrast + x.mean() + self.brightness).clamp(0, 1)
        x = x ** self.gamma
        if self.noise:
            generator = torch.Generator().manual_seed(self.noise_seed)
            x = x + self.noise * torch.randn(x.shape, generator=generator)
        return (x.clamp(0, 1) * top).round().to(image.dtype)

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """(H, W) bool -> (H, W) bool: the geometry only (bilinear, then >= 0.5)."""
        import torch

        warped = self.warp(torch.from_numpy(mask.astype(np.float32))[None])[0]
        return (warped >= 0.5).numpy()


def _flip(name: str, x):
    """Fixed flip or rotation `name` of the last two axes: (..., H, W) -> (..., H', W')."""
    if isinstance(x, np.ndarray):
        ops = {"hflip": lambda a: a[..., ::-1], "vflip": lambda a: a[..., ::-1, :],
               "rot90": lambda a: np.rot90(a, 1, axes=(-2, -1)),
               "rot180": lambda a: np.rot90(a, 2, axes=(-2, -1)),
               "rot270": lambda a: np.rot90(a, 3, axes=(-2, -1))}
        return np.ascontiguousarray(ops[name](x))
    import torch

    ops = {"hflip": lambda t: t.flip(-1), "vflip": lambda t: t.flip(-2),
           "rot90": lambda t: torch.rot90(t, 1, (-2, -1)),
           "rot180": lambda t: torch.rot90(t, 2, (-2, -1)),
           "rot270": lambda t: torch.rot90(t, 3, (-2, -1))}
    return ops[name](x).contiguous()


def transform_image(name: str | None, image: torch.Tensor) -> torch.Tensor:
    """Copy `name` (None: the original) of a (3, H, W) uint8/uint16 image, same dtype."""
    if name is None:
        return image
    if name in FLIPS:
        return _flip(name, image)
    return RandomTransform.parse(name).image(image)


def transform_mask(name: str | None, mask: np.ndarray) -> np.ndarray:
    """Copy `name` (None: the original) of a (H, W) bool mask: the image's geometry only."""
    if name is None:
        return mask
    if name in FLIPS:
        return _flip(name, mask)
    return RandomTransform.parse(name).mask(mask)


def augmented_key(key: str, name: str) -> str:
    return f"{key}:{name}"


@dataclass(frozen=True)
class CopyPlan:
    """Which copies each training image gets: `count` of `family`, drawn with `seed`."""

    family: str = "random"
    count: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"--augment must be one of {FAMILIES}, not {self.family!r}")
        limit = len(FLIPS) if self.family == "flips" else MAX_COPIES
        if not 0 <= self.count <= limit:
            raise ValueError(f"--augment-copies must be between 0 and {limit} "
                             f"with --augment {self.family}")

    def names(self, key: str) -> tuple[str, ...]:
        """The copy names of the image with cache key `key`. A random copy c depends only on
        (seed, c, key): raising `count` keeps the first copies, and so their cache rows."""
        if self.family == "flips":
            return FLIPS[: self.count]
        words = np.frombuffer(hashlib.sha256(key.encode()).digest(), dtype=np.uint32).tolist()
        return tuple(RandomTransform.draw(np.random.default_rng([self.seed, c, *words])).name()
                     for c in range(self.count))


def extraction_jobs(samples, keys: list[str], plan: CopyPlan
                    ) -> dict[str, tuple[str, str | None]]:
    """key -> (image path, copy name or None) for every sample, plus the copies `plan` gives
    each training sample (split `train` or empty)."""
    jobs: dict[str, tuple[str, str | None]] = {}
    for sample, key in zip(samples, keys, strict=True):
        jobs.setdefault(key, (str(sample.image), None))
        if sample.is_train:
            for name in plan.names(key):
                jobs.setdefault(augmented_key(key, name), (str(sample.image), name))
    return jobs
