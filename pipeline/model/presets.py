"""The model's names and sizes that configurations are validated against, without torch.

`pipeline.config` checks `--backbone`, `--levels`, `--amp` and `--cache-block` against these,
so that `--help` and argument errors come before torch, peft and sam3 are imported (importing
them takes seconds). `pipeline.model.backbone` builds from `PRESETS` and re-exports every name
here; `pipeline.model.decoder` takes its default width of the image branch from here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BackbonePreset:
    """Size of a SAM 3 vision backbone; every other argument is SAM 3's own."""

    name: str
    resolution: int
    """Square input side in pixels; the trunk sees ``resolution // 14`` patches a side."""
    pretrain_resolution: int
    """Side of the absolute position embedding, tiled to the input (one attention window)."""
    embed_dim: int
    depth: int
    num_heads: int
    window_size: int
    global_blocks: tuple[int, ...]
    """Blocks with global attention; the last one must be the last block."""
    mlp_ratio: float = 4.625
    patch_size: int = 14

    @property
    def feature_size(self) -> int:
        """Side of `vision_features` (the 1x level)."""
        return self.resolution // self.patch_size

    def level_shape(self, level: str) -> tuple[int, int, int]:
        """(C, h, w) of one sample's features at `level` ("1x", "2x" or "4x"); for a trunk
        token level (`token_level(K)`) the trunk's own channels-last (h, w, embed_dim)."""
        if token_block(level) is not None:
            return (self.feature_size, self.feature_size, self.embed_dim)
        side = self.feature_size * int(level.rstrip("x"))
        return (256, side, side)


PRESETS: dict[str, BackbonePreset] = {
    "sam3": BackbonePreset(
        name="sam3", resolution=1008, pretrain_resolution=336, embed_dim=1024, depth=32,
        num_heads=16, window_size=24, global_blocks=(7, 15, 23, 31),
    ),
    "tiny": BackbonePreset(
        name="tiny", resolution=252, pretrain_resolution=84, embed_dim=64, depth=4,
        num_heads=4, window_size=6, global_blocks=(1, 3),
    ),
}

AMP_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "off": None}
"""Values of --amp (after "auto" is resolved) and the name of each one's torch autocast dtype
(`backbone.AMP_DTYPES` maps them to the dtypes): the one list."""

# `backbone_fpn` levels after SAM 3's `scalp=1`, named by their scale relative to vision_features.
LEVELS = {"4x": 0, "2x": 1, "1x": 2}
# A split cache (`--cache-block K`) stores one level instead: the trunk's tokens after block K.
TOKEN_PREFIX = "block"

IMAGE_CHANNELS = 32
"""Default channels of the decoder's full-resolution image branch (and of the fusion stage
after it)."""


def token_level(block: int) -> str:
    """The cache level holding the trunk's tokens after block `block` ("block23")."""
    return f"{TOKEN_PREFIX}{block}"


def token_block(level: str) -> int | None:
    """K for a token level "block<K>", None for a feature level."""
    rest = level[len(TOKEN_PREFIX):] if level.startswith(TOKEN_PREFIX) else ""
    return int(rest) if rest.isdigit() else None


def cache_levels(levels: tuple[str, ...], cache_block: int | None) -> tuple[str, ...]:
    """The levels a cache stores: the decoder's `levels`, or with a split at block K only the
    tokens after K (the neck's branches of `levels` then run at every step)."""
    return tuple(levels) if cache_block is None else (token_level(cache_block),)
