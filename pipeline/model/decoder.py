"""View-conditioned vessel decoder over cached SAM 3 backbone features.

The backbone (`pipeline.model.backbone`) gives three maps of 256 channels, named by their scale
relative to `vision_features` (see `backbone.LEVELS`): "1x" (R/14 a side), "2x" and "4x". The
decoder projects the 1x map, modulates it with FiLM parameters chosen by the view label (and,
optionally, the acquisition angles), upsamples it while fusing the finer maps, and ends with a
shallow branch on the raw image at full resolution, because vessels 1-2 px wide decide the score
and the finest backbone map (4x, R/3.5 a side) cannot draw them.

Feature maps may come from the cache as float16; every forward casts them to the module's dtype.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.model.backbone import LEVELS
from pipeline.model.presets import IMAGE_CHANNELS

FEATURE_CHANNELS = 256
"""Channels of every SAM 3 backbone level."""
DECODER_LEVELS = tuple(sorted(LEVELS, key=lambda level: int(level[:-1])))
"""The levels a decoder fuses, coarsest first: the backbone's `LEVELS`, the one list."""


def _groups(channels: int) -> int:
    """GroupNorm groups: 8 where they divide `channels`, else the largest divisor below 8."""
    return math.gcd(8, channels)


class ConvBlock(nn.Sequential):
    """3x3 conv (no bias), GroupNorm, GELU: (B, c_in, h, w) float -> (B, c_out, h, w) float."""

    def __init__(self, *, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.GroupNorm(_groups(out_channels), out_channels),
            nn.GELU(),
        )


class FeatureProjection(nn.Module):
    """1x1 conv from `in_channels` to `out_channels`, kept even when they are equal.

    It gives the decoder a trainable linear map of the frozen backbone features.
    (B, in_channels, h, w) float -> (B, out_channels, h, w) float, unbounded.
    """

    def __init__(self, *, in_channels: int = FEATURE_CHANNELS,
                 out_channels: int = FEATURE_CHANNELS) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x.to(self.conv.weight.dtype))


class ViewConditioning(nn.Module):
    """FiLM of a (B, C, h, w) map by a learned per-view embedding (and optional angles).

    The table has `num_views + 1` rows of 256: one per training view label, the last for an
    unknown view. With `use_angles`, (B, 4) = [sin p, cos p, sin s, cos s] (primary and secondary
    angle) go through a linear layer and are added to the embedding. A linear layer maps the sum
    to a per-channel scale and shift: ``y = x * (1 + dscale) + shift``.

    The embedding rows and the angle layer start at zero and the FiLM layer has zero bias, so at
    initialisation the module is the identity for every view and angle; the FiLM weight is random,
    so the embedding receives gradients from the first step.
    """

    def __init__(self, *, num_views: int, channels: int = FEATURE_CHANNELS,
                 use_angles: bool = False, embed_dim: int = 256) -> None:
        super().__init__()
        if num_views < 1:
            raise ValueError(f"num_views must be at least 1, got {num_views}")
        self.num_views = num_views
        self.channels = channels
        self.embedding = nn.Embedding(num_views + 1, embed_dim)
        nn.init.zeros_(self.embedding.weight)
        self.angles = nn.Linear(4, embed_dim) if use_angles else None
        if self.angles is not None:
            nn.init.zeros_(self.angles.weight)
            nn.init.zeros_(self.angles.bias)
        self.film = nn.Linear(embed_dim, 2 * channels)
        nn.init.zeros_(self.film.bias)

    @property
    def unknown_index(self) -> int:
        """The `view_index` value meaning "view not known" (the table's last row)."""
        return self.num_views

    def film_parameters(self, view_index: Tensor, angles: Tensor | None = None
                        ) -> tuple[Tensor, Tensor]:
        """Scale and shift, each (B, C) float, for `view_index` (B,) long in [0, num_views].

        `angles`: (B, 4) float in [-1, 1] or None; ignored (None allowed) without `use_angles`.
        """
        embed = self.embedding(view_index)
        if angles is not None and self.angles is not None:
            embed = embed + self.angles(angles.to(embed.dtype))
        delta_scale, shift = self.film(embed).chunk(2, dim=-1)
        return 1.0 + delta_scale, shift

    def forward(self, x: Tensor, view_index: Tensor, angles: Tensor | None = None) -> Tensor:
        """(B, C, h, w) float -> (B, C, h, w) float, same dtype as the module.

        `view_index`: (B,) long, `num_views` meaning unknown. `angles`: see `film_parameters`.
        """
        if x.shape[1] != self.channels:
            raise ValueError(f"expected {self.channels} channels, got shape {tuple(x.shape)}")
        scale, shift = self.film_parameters(view_index, angles)
        x = x.to(scale.dtype)
        return x * scale[:, :, None, None] + shift[:, :, None, None]


class ImageBranch(nn.Sequential):
    """Two 3x3 conv blocks on the normalised image at full resolution.

    (B, 3, R, R) float in [-1, 1] -> (B, channels, R, R) float, >= -0.17 (after GELU).
    """

    def __init__(self, *, channels: int = IMAGE_CHANNELS) -> None:
        super().__init__(
            ConvBlock(in_channels=3, out_channels=channels),
            ConvBlock(in_channels=channels, out_channels=channels),
        )


class ViewConditionedDecoder(nn.Module):
    """Vessel logits from SAM 3 feature maps, the view label and (optionally) the image.

    1x map -> `projection` -> `conditioning` (FiLM; none with `view_conditioning=False`) ->
    conv block (2*width channels) -> x2 up (+ 1x1-reduced 2x map when used) -> conv block
    (width) -> x2 up (+ 1x1-reduced 4x map when used) -> conv block (width/2) -> [1x1 to
    `image_channels`, bilinear to the image's size, plus `image_branch`, conv block] -> 1x1 conv
    to one logit -> bilinear to `out_size`.
    Without the image branch the decoder's output (at 4x the 1x side) goes straight to the logit.
    The full-resolution stages are kept narrow (`image_channels`): they run on R x R pixels.
    """

    def __init__(self, *, levels: tuple[str, ...] = ("1x",), num_views: int,
                 use_angles: bool = False, image_branch: bool = True, width: int = 64,
                 in_channels: int = FEATURE_CHANNELS, view_conditioning: bool = True,
                 image_channels: int = IMAGE_CHANNELS) -> None:
        super().__init__()
        levels = tuple(levels)
        unknown = [lv for lv in levels if lv not in DECODER_LEVELS]
        if "1x" not in levels or unknown or len(set(levels)) != len(levels):
            raise ValueError(
                f"levels must hold '1x' and optionally '2x', '4x' once each; got {levels}"
            )
        if width < 2 or width % 2:
            raise ValueError(f"width must be a positive even number, got {width}")
        if image_channels < 1:
            raise ValueError(f"image_channels must be positive, got {image_channels}")
        self.levels = tuple(lv for lv in DECODER_LEVELS if lv in levels)
        self.num_views = num_views
        self.use_angles = use_angles
        self.projection = FeatureProjection(in_channels=in_channels)
        # Without view conditioning every view shares one decoder (the ablation of BENCHMARKS.md).
        self.conditioning = (ViewConditioning(num_views=num_views, use_angles=use_angles)
                             if view_conditioning else None)
        self.stem = ConvBlock(in_channels=FEATURE_CHANNELS, out_channels=2 * width)
        self.lateral = nn.ModuleDict()
        if "2x" in self.levels:
            self.lateral["2x"] = nn.Conv2d(in_channels, 2 * width, 1)
        if "4x" in self.levels:
            self.lateral["4x"] = nn.Conv2d(in_channels, width, 1)
        self.up1 = ConvBlock(in_channels=2 * width, out_channels=width)
        self.up2 = ConvBlock(in_channels=width, out_channels=width // 2)
        if image_branch:
            self.image_branch = ImageBranch(channels=image_channels)
            self.reduce = nn.Conv2d(width // 2, image_channels, 1)
            self.fuse = ConvBlock(in_channels=image_channels, out_channels=image_channels)
            self.head = nn.Conv2d(image_channels, 1, 1)
        else:
            self.image_branch = None
            self.head = nn.Conv2d(width // 2, 1, 1)

    @property
    def unknown_view(self) -> int:
        """The `view_index` value meaning "view not known"."""
        return self.num_views

    def _upsample_fuse(self, x: Tensor, features: dict[str, Tensor], level: str) -> Tensor:
        """x2 bilinear upsampling (to the level's own size when used), plus its lateral."""
        if level in self.lateral:
            lateral = self.lateral[level](features[level].to(x.dtype))
            x = F.interpolate(x, size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            return x + lateral
        return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)

    def forward(self, features: dict[str, Tensor], view_index: Tensor,
                image: Tensor | None = None, angles: Tensor | None = None,
                out_size: tuple[int, int] | None = None) -> Tensor:
        """Vessel logits (B, 1, H, W) float (module dtype), unbounded; sigmoid gives P(vessel).

        `features`: {"1x": (B, 256, s, s), "2x": (B, 256, 2s, 2s), "4x": (B, 256, 4s, 4s)}, any
        float dtype (float16 from the cache is fine); levels not used are ignored.
        `view_index`: (B,) long in [0, num_views], `num_views` meaning unknown.
        `image`: (B, 3, R, R) float normalised to [-1, 1]; required with the image branch.
        `angles`: (B, 4) [sin p, cos p, sin s, cos s] or None; used only with `use_angles`.
        `out_size`: (H, W); default the image's size when given, else 4x the largest map used.
        """
        missing = [lv for lv in self.levels if lv not in features]
        if missing:
            raise KeyError(f"features lack level(s) {missing}; have {sorted(features)}")
        if self.image_branch is not None and image is None:
            raise ValueError("this decoder has an image branch: pass image (B, 3, R, R)")
        dtype = self.head.weight.dtype
        x = self.projection(features["1x"].to(dtype))
        if self.conditioning is not None:
            x = self.conditioning(x, view_index, angles)
        x = self.stem(x)
        x = self.up1(self._upsample_fuse(x, features, "2x"))
        x = self.up2(self._upsample_fuse(x, features, "4x"))
        if out_size is None:
            largest = max(features[lv].shape[-1] for lv in self.levels)
            out_size = tuple(image.shape[-2:]) if image is not None else (4 * largest,) * 2
        if self.image_branch is not None:
            detail = self.image_branch(image.to(dtype))
            x = F.interpolate(self.reduce(x), size=detail.shape[-2:], mode="bilinear",
                              align_corners=False)
            x = self.fuse(x + detail)
        logits = self.head(x)
        if tuple(logits.shape[-2:]) != tuple(out_size):
            logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear",
                                   align_corners=False)
        return logits
