"""The detail decoder: feature/pixel alignment of crops, shapes, the plain U-Net at start."""

from __future__ import annotations

import pytest
import torch

from pipeline.data.native_samples import crop_box, cut
from pipeline.model.detail import DetailFusionDecoder, box_grid, sample_box


def position_map(side: int) -> torch.Tensor:
    """(1, 2, side, side): channel 0 the cell's column index, channel 1 its row index."""
    cells = torch.arange(side, dtype=torch.float32)
    return torch.stack([cells[None, :].expand(side, side), cells[:, None].expand(side, side)])[None]


def expected_cell(pixel: torch.Tensor, length: int, side: int) -> torch.Tensor:
    """The continuous cell coordinate of pixel centres `pixel` of an image `length` pixels long
    covered by `side` cells (clamped at the edge cells' centres)."""
    return ((pixel + 0.5) / length * side - 0.5).clamp(0, side - 1)


@pytest.mark.parametrize("height,width,crop", [(999, 960, 128), (300, 300, 256), (100, 80, 128)])
def test_a_crops_features_stay_aligned_with_its_pixels(height, width, crop):
    """Each pixel of a crop sees the feature of its own place in the whole image: a shift of one
    feature cell (14 px of the backbone's input) fails this by a whole unit."""
    side = 18
    rng = __import__("numpy").random.default_rng(0)
    for _ in range(5):
        y0, x0, box = crop_box(height, width, crop, rng)
        sampled = sample_box(position_map(side), box[None], (crop, crop))[0]  # (2, crop, crop)
        rows = torch.arange(crop, dtype=torch.float32) + y0
        cols = torch.arange(crop, dtype=torch.float32) + x0
        want_x = expected_cell(cols, width, side)[None, :].expand(crop, crop)
        want_y = expected_cell(rows, height, side)[:, None].expand(crop, crop)
        inside = (rows < height)[:, None] & (cols < width)[None, :]  # padding reaches past
        torch.testing.assert_close(sampled[0][inside], want_x[inside], atol=1e-4, rtol=0)
        torch.testing.assert_close(sampled[1][inside], want_y[inside], atol=1e-4, rtol=0)
        shifted = sample_box(position_map(side).roll(1, dims=-1), box[None], (crop, crop))[0]
        assert (shifted[0][inside] - want_x[inside]).abs().max() > 0.5


def test_cut_pads_an_image_smaller_than_the_crop_with_zeros():
    image = torch.arange(2 * 3 * 5, dtype=torch.uint8).reshape(2, 3, 5)
    piece = cut(image, 0, 0, 8)
    assert piece.shape == (2, 8, 8)
    assert torch.equal(piece[:, :3, :5], image)
    assert piece[:, 3:].eq(0).all() and piece[:, :, 5:].eq(0).all()


def test_a_reversed_box_samples_the_region_mirrored():
    features = torch.randn(1, 4, 18, 18)
    box = torch.tensor([[0.1, 0.2, 0.7, 0.9]])
    flipped = torch.tensor([[0.7, 0.2, 0.1, 0.9]])
    torch.testing.assert_close(sample_box(features, flipped, (40, 30)),
                               sample_box(features, box, (40, 30)).flip(-1))


def test_the_whole_box_grid_is_grid_samples_identity():
    grid = box_grid(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), (18, 18))
    features = torch.randn(1, 3, 18, 18)
    out = torch.nn.functional.grid_sample(features, grid, align_corners=False)
    torch.testing.assert_close(out, features, atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [(64, 64), (50, 37), (999 // 8, 960 // 8)])
@pytest.mark.parametrize("levels", [("1x",), ("1x", "4x")])
def test_logits_come_at_the_pixels_own_size(size, levels):
    decoder = DetailFusionDecoder(levels=levels, num_views=2, width=4, depth=3)
    features = {"1x": torch.randn(2, 256, 6, 6), "4x": torch.randn(2, 256, 24, 24)}
    out = decoder(features, torch.tensor([0, 2]), torch.randn(2, 3, *size),
                  boxes=torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.2, 0.1, 0.9, 1.0]]))
    assert out.shape == (2, 1, *size)


def test_a_fresh_decoder_is_the_plain_unet_and_learns_to_use_the_features():
    """The feature injections start at zero: at init the features change nothing; after one
    step they receive gradients and change the output."""
    torch.manual_seed(0)
    decoder = DetailFusionDecoder(num_views=1, width=4, depth=2)
    image, view = torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.long)
    a, b = {"1x": torch.randn(2, 256, 4, 4)}, {"1x": torch.randn(2, 256, 4, 4)}
    torch.testing.assert_close(decoder(a, view, image), decoder(b, view, image))
    decoder(a, view, image).square().mean().backward()
    assert all(conv.weight.grad.abs().sum() > 0 for conv in decoder.inject)
    with torch.no_grad():
        for conv in decoder.inject:
            conv.weight -= 0.1 * conv.weight.grad
    assert not torch.allclose(decoder(a, view, image), decoder(b, view, image))


def test_without_features_the_decoder_ignores_them_and_still_depends_on_the_view():
    torch.manual_seed(0)
    decoder = DetailFusionDecoder(num_views=2, width=4, depth=2, features=False)
    with torch.no_grad():
        decoder.conditioning.embedding.weight.normal_()
    image = torch.randn(1, 3, 32, 32)
    out = decoder(None, torch.tensor([0]), image)
    assert not torch.allclose(out, decoder(None, torch.tensor([1]), image))
    assert not any("projection" in name for name, _ in decoder.named_parameters())


def test_deep_supervision_adds_the_coarser_levels_in_training_only():
    """In training, each auxiliary head's logits come after the main ones at the output's size
    and train their head; in eval the output is the main logits alone, unchanged by them."""
    torch.manual_seed(0)
    decoder = DetailFusionDecoder(num_views=1, width=4, depth=3, deep_supervision=2)
    image, view = torch.randn(2, 3, 40, 36), torch.zeros(2, dtype=torch.long)
    features = {"1x": torch.randn(2, 256, 4, 4)}
    out = decoder(features, view, image)
    assert out.shape == (2, 3, 40, 36)
    out[:, 1:].sum().backward()
    assert all(head.weight.grad.abs().sum() > 0 for head in decoder.aux_heads)
    main = decoder.head.weight.grad  # the main head is not behind the extra channels
    assert main is None or not main.any()
    decoder.eval()
    plain = DetailFusionDecoder(num_views=1, width=4, depth=3).eval()
    plain.load_state_dict({k: v for k, v in decoder.state_dict().items()
                           if not k.startswith("aux_heads.")})
    torch.testing.assert_close(decoder(features, view, image), plain(features, view, image))
    with pytest.raises(ValueError, match="deep_supervision must be 0 to depth - 1"):
        DetailFusionDecoder(num_views=1, depth=3, deep_supervision=3)
