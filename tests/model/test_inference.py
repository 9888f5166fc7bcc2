"""Whole-image inference: tiles against one piece, and mirror TTA's inverse mapping."""

from __future__ import annotations

import pytest
import torch

from pipeline.model.detail import DetailFusionDecoder, sample_box
from pipeline.model.inference import MIRRORS, infer_logits, mirrored_boxes, tile_starts

CONTEXT = torch.randn(1, 2, 18, 18, generator=torch.Generator().manual_seed(0))


def pointwise(pixels: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """A decoder whose logit at a pixel depends on that pixel and the feature at its place
    only, not on where the piece was cut nor on its orientation."""
    features = sample_box(CONTEXT.expand(len(pixels), -1, -1, -1), boxes,
                          tuple(pixels.shape[-2:]))
    return (pixels[:, :1] * features[:, :1] + features[:, 1:]).float()


@pytest.mark.parametrize("tile", [0, 32, 48, 100])
def test_tiles_equal_one_piece_for_a_decoder_that_sees_only_its_pixel(tile):
    image = torch.randn(1, 3, 90, 70)
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    whole = pointwise(image, boxes)
    torch.testing.assert_close(infer_logits(pointwise, image, boxes, tile_size=tile), whole,
                               atol=1e-4, rtol=0)


def test_tiles_of_a_real_decoder_agree_with_one_piece_within_tolerance():
    """Where both fit: a U-Net's tiles differ from the whole only near their borders, and
    the blending keeps that small."""
    torch.manual_seed(0)
    decoder = DetailFusionDecoder(num_views=1, width=4, depth=2).eval()
    with torch.no_grad():
        for conv in decoder.inject:  # features matter, as after training
            conv.weight.normal_(0, 0.1)
        features = {"1x": torch.randn(1, 256, 6, 6)}
        context = decoder.feature_context(features, torch.zeros(1, dtype=torch.long))

        def decode(pixels, boxes):
            return decoder(None, torch.zeros(1, dtype=torch.long), pixels, boxes=boxes,
                           context=context)

        image, boxes = torch.randn(1, 3, 96, 96), torch.tensor([[0.0, 0.0, 1.0, 1.0]])
        whole = decode(image, boxes)
        tiled = infer_logits(decode, image, boxes, tile_size=64)
    assert (tiled - whole).abs().mean() < 0.05 * whole.abs().mean()
    assert ((tiled > 0) == (whole > 0)).float().mean() > 0.97


def test_mirror_tta_maps_every_flip_back_exactly():
    """With a decoder that is itself unchanged by mirroring both pixels and box, each of the
    four passes maps back onto the plain one: their mean is it, to rounding."""
    image, boxes = torch.randn(2, 3, 40, 30), torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2)
    plain = pointwise(image, boxes)
    for dims in MIRRORS:
        flipped = pointwise(image.flip(dims) if dims else image, mirrored_boxes(boxes, dims))
        torch.testing.assert_close(flipped.flip(dims) if dims else flipped, plain,
                                   atol=1e-4, rtol=0)
    torch.testing.assert_close(infer_logits(pointwise, image, boxes, mirror=True), plain,
                               atol=1e-4, rtol=0)


def test_mirror_tta_averages_orientation_dependent_outputs():
    """A decoder that sees orientation (here: the column index) gives the mean over flips."""
    def columns(pixels, boxes):
        return torch.arange(pixels.shape[-1], dtype=torch.float32).expand(
            pixels.shape[0], 1, *pixels.shape[-2:])

    image, boxes = torch.randn(1, 3, 4, 5), torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    out = infer_logits(columns, image, boxes, mirror=True)
    torch.testing.assert_close(out, torch.full((1, 1, 4, 5), 2.0))


def test_tile_starts_cover_the_length_with_overlap():
    assert tile_starts(100, 100) == [0]
    assert tile_starts(90, 100) == [0]
    starts = tile_starts(250, 100)
    assert starts[0] == 0 and starts[-1] == 150
    assert all(b - a < 100 for a, b in zip(starts, starts[1:], strict=False))
