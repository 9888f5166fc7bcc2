"""The trainable model: SAM 3's backbone with a peft LoRA adapter, and the view-conditioned decoder.

Cached steps feed stored features straight to the decoder; end-to-end steps run the backbone
(LoRA active, base weights frozen; SAM 3's ViT recomputes each block in the backward pass unless
`--no-activation-checkpointing`). With a split cache (`--cache-block K`) cached steps start from
the stored trunk tokens after block K and run the rest of the trunk (LoRA there trains at every
step, checkpointed as end to end), the neck's branches of the levels and the decoder.
"""

from __future__ import annotations

import torch
from timm.layers import DropPath
from torch import nn

from pipeline.data.images import normalize
from pipeline.model.backbone import (
    amp_autocast,
    build_backbone,
    features_from_tokens,
    image_features,
    token_level,
    trunk_tokens,
)
from pipeline.model.decoder import ViewConditionedDecoder
from pipeline.model.detail import DetailFusionDecoder
from pipeline.model.inference import infer_logits
from pipeline.model.lora import attach_lora, load_adapter, set_trainable_params


class VesselSegmenter(nn.Module):
    """`backbone` (a peft LoRA model around SAM 3's vision backbone, or the plain backbone of
    an exported checkpoint) + `decoder`."""

    def __init__(self, *, backbone: nn.Module,
                 decoder: ViewConditionedDecoder | DetailFusionDecoder, amp: str,
                 cache_block: int | None = None):
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder
        self.amp = amp
        self.cache_block = cache_block
        """K of a split cache: batch["features"] holds the trunk's tokens after block K."""
        base = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
        self.resolution = base.preset.resolution
        self.native = isinstance(decoder, DetailFusionDecoder)
        """The detail decoder: batches carry "pixels" and "box" at the image's own resolution
        (`pipeline.data.native_samples`), and logits come at that resolution."""

    def train(self, mode: bool = True) -> VesselSegmenter:
        """Train mode with the trunk's stochastic depth (DropPath) kept off: the cache holds
        features of the backbone in eval mode, and the head must see those same features
        whether a step is cached, split or end to end (measured: with drop-path on, end-to-end
        intervals lowered val Dice on CHASE_DB1). LoRA's own dropout still applies."""
        super().train(mode)
        for module in self.backbone.modules():
            if isinstance(module, DropPath):
                module.eval()
        return self

    def autocast(self, device: torch.device):
        return amp_autocast(self.amp, device)

    def live_features(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """image (B, 3, R, R) uint8 (as `SegmentationSamples` gives it) -> {level: (B, 256, h, w)}
        through the backbone."""
        return self._backbone_features(normalize(image))

    def _backbone_features(self, normalized: torch.Tensor) -> dict[str, torch.Tensor]:
        with self.autocast(normalized.device):
            return image_features(self.backbone, normalized, self.decoder.levels)

    def cache_features(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the cache would store for `image` (B, 3, R, R) uint8 with the adapter as it is
        now: {level: (B, 256, h, w)}, or with a split {"block<K>": (B, h, w, C)}."""
        if self.cache_block is None:
            return self.live_features(image)
        with self.autocast(image.device):
            tokens = trunk_tokens(self.backbone, normalize(image), self.cache_block)
        return {token_level(self.cache_block): tokens}

    def cached_features(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The decoder's {level: (B, 256, h, w)} from a batch's cached `features`: as they are,
        or from a split cache's tokens (B, h, w, C) (any float dtype) through the rest of the
        trunk and the neck."""
        if self.cache_block is None:
            return features
        tokens = features[token_level(self.cache_block)]
        # float32 like the live trunk's residual stream (autocast casts inside the blocks).
        with self.autocast(tokens.device):
            return features_from_tokens(self.backbone, tokens.float(), self.cache_block,
                                        self.decoder.levels)

    def _features(self, batch: dict, live: bool) -> dict[str, torch.Tensor] | None:
        """The decoder's {level: (B, 256, h, w)}: live from batch["image"], else cached."""
        if self.native and not self.decoder.uses_features:
            return None
        if live:
            return self._backbone_features(normalize(batch["image"]))
        return self.cached_features(batch["features"])

    def forward(self, batch: dict, live: bool = False) -> torch.Tensor:
        """Logits (B, 1, R, R) float32 for a collated batch of `SegmentationSamples`; with the
        detail decoder (B, 1, h, w) at the size of batch["pixels"] (B, 3, h, w) uint8.

        live=False uses batch["features"] (cached: levels, or a split cache's tokens);
        live=True runs the backbone on batch["image"] ((B, 3, R, R) uint8, normalised here, on
        the model's device).
        """
        if self.native:
            features = self._features(batch, live)
            angles = batch["angles"] if self.decoder.use_angles else None
            with self.autocast(batch["view"].device):
                logits = self.decoder(features, batch["view"], normalize(batch["pixels"]),
                                      boxes=batch["box"], angles=angles)
            return logits.float()
        image = normalize(batch["image"]) if "image" in batch else None
        features = (self._backbone_features(image) if live
                    else self.cached_features(batch["features"]))
        angles = batch["angles"] if self.decoder.use_angles else None
        with self.autocast(batch["view"].device):
            logits = self.decoder(features, batch["view"], image=image,
                                  angles=angles, out_size=(self.resolution, self.resolution))
        return logits.float()

    @torch.no_grad()
    def infer(self, batch: dict, live: bool = False, *, tile_size: int = 0,
              mirror: bool = False) -> torch.Tensor:
        """Whole-image logits, float32: the detail decoder through `inference.infer_logits`
        (tiles of `tile_size`, mirror TTA), (B, 1, h, w) at the size of batch["pixels"]; the
        legacy decoder's `forward` (B, 1, R, R)."""
        if not self.native:
            return self(batch, live=live)
        features = self._features(batch, live)
        angles = batch["angles"] if self.decoder.use_angles else None
        device = batch["view"].device
        with self.autocast(device):
            context = (self.decoder.feature_context(features, batch["view"], angles)
                       if features is not None else None)

        def decode(pixels, boxes):
            with self.autocast(device):
                return self.decoder(None, batch["view"], pixels, boxes=boxes, angles=angles,
                                    context=context)

        return infer_logits(decode, normalize(batch["pixels"]), batch["box"],
                            tile_size=tile_size, mirror=mirror)


def build_decoder(config, *, num_views: int, use_angles: bool
                  ) -> ViewConditionedDecoder | DetailFusionDecoder:
    """The decoder `config.decoder` names: `detail` (`DetailFusionDecoder`) or `legacy`
    (`ViewConditionedDecoder`, runs made before the detail decoder)."""
    if config.decoder == "detail":
        return DetailFusionDecoder(levels=config.levels, num_views=num_views,
                                   use_angles=use_angles, width=config.detail_width,
                                   depth=config.detail_depth, features=config.features,
                                   view_conditioning=config.view_conditioning,
                                   # a head file has none: its heads are for training
                                   deep_supervision=getattr(config, "deep_supervision", 0))
    return ViewConditionedDecoder(levels=config.levels, num_views=num_views,
                                  use_angles=use_angles, image_branch=config.image_branch,
                                  width=config.width, image_channels=config.image_channels,
                                  view_conditioning=config.view_conditioning)


def build_segmenter(config, *, num_views: int, use_angles: bool) -> VesselSegmenter:
    """A fresh model for `config` (a TrainConfig): LoRA on the trunk, a new decoder."""
    # The decoder first: its initial weights then depend on the seed alone, not on how many
    # LoRA matrices were drawn before it (--cache-block K puts LoRA in fewer blocks).
    decoder = build_decoder(config, num_views=num_views, use_angles=use_angles)
    backbone = build_backbone(config.backbone, config.checkpoint)
    if config.adapter:
        peft_model = load_adapter(backbone, config.adapter, trainable=True)
    else:
        peft_model = attach_lora(backbone, r=config.lora_r, alpha=config.lora_alpha,
                                 dropout=config.lora_dropout,
                                 after_block=config.lora_after_block)
    # SAM 3's ViT checkpoints its blocks whenever it is in train mode and this is set.
    peft_model.get_base_model().vision_backbone.trunk.use_act_checkpoint = (
        config.activation_checkpointing)
    model = VesselSegmenter(backbone=peft_model, decoder=decoder, amp=config.amp,
                            cache_block=config.cache_block)
    set_trainable_params(model)
    return model


def lora_state(model: VesselSegmenter) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model.backbone)
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def load_lora_state(model: VesselSegmenter, state: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model.backbone, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise KeyError(f"LoRA state has unexpected keys: {unexpected[:5]}")
