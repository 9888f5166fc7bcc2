"""The detail decoder: a U-Net on the image at its own resolution, fused with SAM 3's features.

Vessels 1-2 px wide decide the score, and the backbone sees the image squeezed to its square
resolution (252 px for `tiny`, 1008 px for SAM 3), where they are sub-pixel. This decoder runs a
light U-Net (`detail_depth` poolings, `detail_width` channels at full size, doubling per level)
on the image at its own size (or on a crop of it in training), and adds the backbone's maps,
projected and view-conditioned, at every level from 1/2 down:

    features {1x (, 2x, 4x)} -> projection -> FiLM(view, angles) -> conv block (context)
        [-> upsampled + lateral of 2x, 4x]
    context --grid_sample(box)--> each U-Net level's grid -> 1x1 conv (zero at start) -> added

`box` says where the pixels lie in the image the features were computed from (the whole image,
stretched to the square resolution by `sam3_resize`): (x0, y0, x1, y1) as fractions of its width
and height. A crop samples the matching region of the feature maps, so feature and pixel stay
aligned however the crop is cut; a box with x0 > x1 (y0 > y1) samples it mirrored, which is how
mirror test-time augmentation flips both together (`pipeline.model.inference`).

With `deep_supervision` N, training also returns the next N coarser decoder levels' logits
through their own 1x1 heads, upsampled to the output's size, as extra channels (the loss weighs
them, `pipeline.model.losses.training_loss`); in eval mode the output is the main logits alone.

The 1x1 convs that add the features start at zero, so a fresh decoder is the plain U-Net and the
features contribute what training finds useful in them. With `features=False` the decoder is
that U-Net alone (the ablation in BENCHMARKS.md), view-conditioned at its bottleneck.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.model.decoder import (
    DECODER_LEVELS,
    FEATURE_CHANNELS,
    ConvBlock,
    FeatureProjection,
    ViewConditioning,
)

CONTEXT_CHANNELS = 64
"""Channels of the feature context map that is sampled onto the U-Net's levels."""


def box_grid(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Sampling grid of the (h, w) pixel centres of each box, for `grid_sample` with
    align_corners=False over a map that covers the whole image.

    `boxes` (B, 4) float: x0, y0, x1, y1 as fractions of the image's width and height (a crop's
    edges; x0 > x1 mirrors). Returns (B, h, w, 2) float in the [-1, 1] units of grid_sample
    (beyond them where the box leaves the image).
    """
    h, w = size
    boxes = boxes.float()
    ty = (torch.arange(h, device=boxes.device, dtype=torch.float32) + 0.5) / h  # (h,)
    tx = (torch.arange(w, device=boxes.device, dtype=torch.float32) + 0.5) / w  # (w,)
    ys = boxes[:, 1:2] + ty[None] * (boxes[:, 3:4] - boxes[:, 1:2])  # (B, h)
    xs = boxes[:, 0:1] + tx[None] * (boxes[:, 2:3] - boxes[:, 0:1])  # (B, w)
    grid_y = ys[:, :, None].expand(-1, h, w)
    grid_x = xs[:, None, :].expand(-1, h, w)
    return torch.stack([grid_x, grid_y], dim=-1) * 2 - 1


def sample_box(feature_map: Tensor, boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """The region `boxes` of `feature_map` (B, C, s, s) resampled to (B, C, h, w) bilinearly,
    edge values beyond the image (so a padded crop sees the nearest feature)."""
    grid = box_grid(boxes, size).to(feature_map.dtype)
    return F.grid_sample(feature_map, grid, mode="bilinear", padding_mode="border",
                         align_corners=False)


class DoubleConv(nn.Sequential):
    """Two (3x3 conv, BatchNorm, GELU): (B, c_in, h, w) -> (B, c_out, h, w).

    BatchNorm, not GroupNorm: at inference it uses running statistics, so a training crop, a
    tile and a whole image are normalised alike (GroupNorm normalises each piece over itself,
    so tiles differ from the whole image and training crops from what is predicted)."""

    def __init__(self, *, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels), nn.GELU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels), nn.GELU())


class DetailFusionDecoder(nn.Module):
    """Vessel logits at the pixels' own resolution from the image, the view and SAM 3's maps.

    `width`: channels at full resolution (level l has width * 2**l); `depth`: poolings (the
    bottleneck is at 1/2**depth); `features`: fuse the backbone's maps (else a plain U-Net);
    `deep_supervision`: auxiliary heads on decoder levels 1..N (training only).
    """

    def __init__(self, *, levels: tuple[str, ...] = ("1x",), num_views: int,
                 use_angles: bool = False, width: int = 16, depth: int = 4,
                 features: bool = True, view_conditioning: bool = True,
                 deep_supervision: int = 0,
                 in_channels: int = FEATURE_CHANNELS,
                 context_channels: int = CONTEXT_CHANNELS) -> None:
        super().__init__()
        levels = tuple(levels)
        if "1x" not in levels or any(lv not in DECODER_LEVELS for lv in levels):
            raise ValueError(f"levels must hold '1x' and optionally '2x', '4x'; got {levels}")
        if width < 1 or depth < 1:
            raise ValueError(f"width and depth must be >= 1, got {width} and {depth}")
        if not 0 <= deep_supervision < depth:
            raise ValueError(f"deep_supervision must be 0 to depth - 1, got {deep_supervision}")
        self.levels = tuple(lv for lv in DECODER_LEVELS if lv in levels)
        self.num_views, self.use_angles, self.depth = num_views, use_angles, depth
        self.uses_features = features
        channels = [width * 2**level for level in range(depth + 1)]
        self.down = nn.ModuleList(
            [DoubleConv(in_channels=3, out_channels=channels[0])]
            + [DoubleConv(in_channels=channels[i - 1], out_channels=channels[i])
               for i in range(1, depth + 1)])
        self.up = nn.ModuleList(
            [DoubleConv(in_channels=channels[i + 1] + channels[i], out_channels=channels[i])
             for i in range(depth)])
        self.head = nn.Conv2d(channels[0], 1, 1)
        self.aux_heads = nn.ModuleList([nn.Conv2d(channels[level], 1, 1)
                                        for level in range(1, deep_supervision + 1)])
        conditioning = dict(num_views=num_views, use_angles=use_angles)
        self.conditioning = None
        if features:
            self.projection = FeatureProjection(in_channels=in_channels)
            if view_conditioning:
                self.conditioning = ViewConditioning(**conditioning)
            self.context = ConvBlock(in_channels=FEATURE_CHANNELS, out_channels=context_channels)
            self.lateral = nn.ModuleDict({lv: nn.Conv2d(in_channels, context_channels, 1)
                                          for lv in self.levels if lv != "1x"})
            # Level l (1..depth) of the U-Net gets the context through its own 1x1 conv,
            # zero at start: a fresh decoder is the plain U-Net.
            self.inject = nn.ModuleList([nn.Conv2d(context_channels, channels[level], 1)
                                         for level in range(1, depth + 1)])
            for conv in self.inject:
                nn.init.zeros_(conv.weight)
                nn.init.zeros_(conv.bias)
        elif view_conditioning:
            self.conditioning = ViewConditioning(channels=channels[-1], **conditioning)

    @property
    def unknown_view(self) -> int:
        return self.num_views

    def feature_context(self, features: dict[str, Tensor], view_index: Tensor,
                        angles: Tensor | None = None) -> Tensor:
        """(B, context_channels, s', s') of the backbone's maps ({level: (B, 256, ...)}, any
        float dtype), at the finest level used (s' = s, 2s or 4s)."""
        dtype = self.head.weight.dtype
        x = self.projection(features["1x"].to(dtype))
        if self.conditioning is not None:
            x = self.conditioning(x, view_index, angles)
        x = self.context(x)
        for level, lateral in self.lateral.items():
            side = lateral(features[level].to(dtype))
            x = F.interpolate(x, size=side.shape[-2:], mode="bilinear", align_corners=False)
            x = x + side
        return x

    def forward(self, features: dict[str, Tensor] | None, view_index: Tensor, image: Tensor,
                boxes: Tensor | None = None, angles: Tensor | None = None,
                context: Tensor | None = None) -> Tensor:
        """Logits (B, 1, h, w) float (module dtype) at the image's own size, unbounded; in
        training with deep supervision (B, 1 + N, h, w), the auxiliary levels' after the main.

        `image`: (B, 3, h, w) float in [-1, 1], any h, w (a crop, a tile or a whole image).
        `features`: as `feature_context` takes them (ignored without features; not needed when
        `context`, their `feature_context`, is given). `boxes`: (B, 4) where `image` lies in the
        image the features describe (default: all of it, (0, 0, 1, 1)). `view_index` (B,) long
        in [0, num_views]; `angles` (B, 4) or None.
        """
        dtype = self.head.weight.dtype
        x = image.to(dtype)
        if self.uses_features:
            if context is None:
                if features is None:
                    raise ValueError("this decoder fuses backbone features: pass features")
                context = self.feature_context(features, view_index, angles)
            if boxes is None:
                boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]], device=x.device).expand(len(x), 4)
        skips = []
        for level, block in enumerate(self.down):
            if level:
                x = F.max_pool2d(x, 2, ceil_mode=True)
            x = block(x)
            if level == self.depth and not self.uses_features and self.conditioning is not None:
                x = self.conditioning(x, view_index, angles)
            x = self._inject(x, level, context, boxes)
            skips.append(x)
        aux = []
        for level in reversed(range(self.depth)):
            skip = skips[level]
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = self.up[level](torch.cat([x, skip], dim=1))
            if level:
                x = self._inject(x, level, context, boxes)
            if self.training and 0 < level <= len(self.aux_heads):
                aux.append(self.aux_heads[level - 1](x))
        logits = self.head(x)
        if not aux:
            return logits
        size = logits.shape[-2:]
        return torch.cat([logits, *(F.interpolate(a, size=size, mode="bilinear",
                                                  align_corners=False)
                                    for a in reversed(aux))], dim=1)

    def _inject(self, x: Tensor, level: int, context: Tensor | None, boxes: Tensor | None
                ) -> Tensor:
        """x plus the context sampled onto its grid (levels 1..depth, with features)."""
        if context is None or level == 0:
            return x
        sampled = sample_box(context.to(x.dtype), boxes, tuple(x.shape[-2:]))
        return x + self.inject[level - 1](sampled)
