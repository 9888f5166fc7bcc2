"""The view-conditioned decoder: shapes, FiLM identity at init, view dependence, gradients."""

from __future__ import annotations

import time

import pytest
import torch

from pipeline.model.decoder import FeatureProjection, ViewConditionedDecoder, ViewConditioning
from pipeline.model.losses import dice_bce_loss

NUM_VIEWS = 3
SIDE = 8  # the tiny preset has 18 (2x = 36, 4x = 72, image 252); smaller keeps the tests fast
IMAGE = 14 * SIDE


def features(batch: int = 2, side: int = SIDE, dtype=torch.float32) -> dict[str, torch.Tensor]:
    return {
        name: torch.randn(batch, 256, side * scale, side * scale, dtype=dtype)
        for name, scale in (("1x", 1), ("2x", 2), ("4x", 4))
    }


def views(batch: int = 2) -> torch.Tensor:
    return torch.arange(batch) % (NUM_VIEWS + 1)  # includes the unknown index


LEVEL_SETS = [("1x",), ("1x", "2x"), ("1x", "4x"), ("1x", "2x", "4x")]


def test_tiny_preset_sizes():
    model = ViewConditionedDecoder(levels=("1x", "2x", "4x"), num_views=NUM_VIEWS)
    out = model(features(1, side=18), views(1), image=torch.randn(1, 3, 252, 252))
    assert out.shape == (1, 1, 252, 252)


@pytest.mark.parametrize("levels", LEVEL_SETS)
@pytest.mark.parametrize("image_branch", [True, False])
def test_output_shapes(levels, image_branch):
    torch.manual_seed(0)
    model = ViewConditionedDecoder(levels=levels, num_views=NUM_VIEWS, image_branch=image_branch)
    feats, image = features(), torch.randn(2, 3, IMAGE, IMAGE)
    assert model(feats, views(), image=image).shape == (2, 1, IMAGE, IMAGE)
    assert model(feats, views(), image=image, out_size=(100, 60)).shape == (2, 1, 100, 60)
    if not image_branch:
        largest = SIDE * (4 if "4x" in levels else 2 if "2x" in levels else 1)
        assert model(feats, views()).shape == (2, 1, 4 * largest, 4 * largest)


def test_image_branch_needs_image():
    model = ViewConditionedDecoder(levels=("1x",), num_views=NUM_VIEWS)
    with pytest.raises(ValueError, match="image"):
        model(features(), views())


def test_levels_validated_and_required():
    for bad in [("2x",), ("1x", "8x"), ("1x", "1x")]:
        with pytest.raises(ValueError):
            ViewConditionedDecoder(levels=bad, num_views=NUM_VIEWS)
    model = ViewConditionedDecoder(levels=("1x", "4x"), num_views=NUM_VIEWS, image_branch=False)
    with pytest.raises(KeyError, match="4x"):
        model({"1x": torch.randn(1, 256, SIDE, SIDE)}, views(1))


def test_projection_is_a_conv_even_at_256_channels():
    projection = FeatureProjection(in_channels=256)
    assert isinstance(projection.conv, torch.nn.Conv2d)
    assert projection.conv.kernel_size == (1, 1)
    assert projection(torch.randn(1, 256, 4, 4)).shape == (1, 256, 4, 4)
    assert FeatureProjection(in_channels=64)(torch.randn(1, 64, 4, 4)).shape == (1, 256, 4, 4)


@pytest.mark.parametrize("use_angles", [False, True])
def test_film_is_identity_at_init(use_angles):
    torch.manual_seed(0)
    conditioning = ViewConditioning(num_views=NUM_VIEWS, use_angles=use_angles)
    x = torch.randn(NUM_VIEWS + 1, 256, 5, 5)
    index = torch.arange(NUM_VIEWS + 1)
    angles = torch.randn(NUM_VIEWS + 1, 4) if use_angles else None
    torch.testing.assert_close(conditioning(x, index, angles), x)


def test_views_and_angles_change_the_output_once_trained():
    torch.manual_seed(0)
    conditioning = ViewConditioning(num_views=NUM_VIEWS, use_angles=True)
    with torch.no_grad():
        conditioning.embedding.weight.normal_()
        conditioning.angles.weight.normal_()
    x = torch.randn(1, 256, 5, 5).expand(NUM_VIEWS + 1, -1, -1, -1)
    out = conditioning(x, torch.arange(NUM_VIEWS + 1))
    for a in range(NUM_VIEWS + 1):
        for b in range(a + 1, NUM_VIEWS + 1):
            assert not torch.allclose(out[a], out[b])
    index = torch.zeros(2, dtype=torch.long)
    angles = torch.tensor([[0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.5, 0.866]])
    with_angles = conditioning(x[:2], index, angles)
    assert not torch.allclose(with_angles[0], with_angles[1])
    torch.testing.assert_close(conditioning(x[:2], index), out[[0, 0]])


def test_decoder_output_depends_on_view_after_perturbing_embedding():
    torch.manual_seed(0)
    model = ViewConditionedDecoder(levels=("1x", "4x"), num_views=NUM_VIEWS, image_branch=False)
    feats = {k: v[:1].expand(2, -1, -1, -1) for k, v in features(1).items()}
    same = model(feats, torch.tensor([0, NUM_VIEWS]))
    torch.testing.assert_close(same[0], same[1])
    with torch.no_grad():
        model.conditioning.embedding.weight.normal_()
    different = model(feats, torch.tensor([0, NUM_VIEWS]))
    assert not torch.allclose(different[0], different[1])


def test_unknown_view_index():
    model = ViewConditionedDecoder(levels=("1x",), num_views=NUM_VIEWS, image_branch=False)
    assert model.unknown_view == model.conditioning.unknown_index == NUM_VIEWS
    out = model(features(1), torch.tensor([NUM_VIEWS]))
    assert torch.isfinite(out).all()
    with pytest.raises(IndexError):
        model(features(1), torch.tensor([NUM_VIEWS + 1]))


def test_gradients_reach_every_part():
    torch.manual_seed(0)
    model = ViewConditionedDecoder(levels=("1x", "2x", "4x"), num_views=NUM_VIEWS,
                                   use_angles=True)
    image = torch.randn(2, 3, IMAGE, IMAGE)
    out = model(features(), views(), image=image, angles=torch.randn(2, 4))
    dice_bce_loss(out, (torch.rand_like(out) > 0.9).float()).backward()
    named = dict(model.named_parameters())
    without = [n for n, p in named.items() if p.grad is None or not p.grad.abs().sum() > 0]
    # At init the embedding is zero, so the FiLM weight's gradient (embedding x upstream) is too.
    assert without == ["conditioning.film.weight"]
    used_rows = model.conditioning.embedding.weight.grad.abs().sum(dim=1) > 0
    assert used_rows.tolist() == [True, True, False, False]
    for prefix in ("projection.", "conditioning.", "stem.", "lateral.2x", "lateral.4x",
                   "image_branch.", "fuse.", "head."):
        assert any(n.startswith(prefix) for n in named), prefix


def test_float16_inputs_accepted():
    model = ViewConditionedDecoder(levels=("1x", "2x", "4x"), num_views=NUM_VIEWS)
    image = torch.randn(2, 3, IMAGE, IMAGE).half()
    out = model(features(dtype=torch.float16), views(), image=image)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def _line_sample(side: int = 8):
    """Random features, an image with a bright 2 px diagonal line, and that line's mask."""
    size = 14 * side
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    mask = ((yy - 0.6 * xx - 20).abs() < 1.0).float()[None, None]
    image = (0.8 * mask - 0.4 + 0.1 * torch.randn(1, 1, size, size)).expand(1, 3, -1, -1)
    return features(1, side), image, mask


def _dice(logits: torch.Tensor, mask: torch.Tensor) -> float:
    pred, target = logits > 0, mask.bool()
    return float(2 * (pred & target).sum() / (pred.sum() + target.sum()))


def test_overfits_one_line_sample():
    """Fits a 2 px line to Dice > 0.9 within 100 Adam steps (about 30 when run alone)."""
    torch.manual_seed(0)
    feats, image, mask = _line_sample()
    model = ViewConditionedDecoder(levels=("1x", "4x"), num_views=NUM_VIEWS)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    view = torch.tensor([1])
    start = time.perf_counter()
    for step in range(1, 101):
        optimiser.zero_grad()
        logits = model(feats, view, image=image)
        dice_bce_loss(logits, mask).backward()
        optimiser.step()
        if step % 10 == 0 and _dice(logits, mask) > 0.95:
            break
    elapsed = time.perf_counter() - start
    with torch.no_grad():
        dice = _dice(model(feats, view, image=image), mask)
    assert dice > 0.9, f"dice {dice:.3f} after {step} steps ({elapsed:.1f} s)"


def test_without_view_conditioning_every_view_gets_the_same_logits():
    torch.manual_seed(0)
    model = ViewConditionedDecoder(levels=("1x",), num_views=NUM_VIEWS, image_branch=False,
                                   view_conditioning=False)
    assert model.conditioning is None
    assert not any("conditioning" in name for name, _ in model.named_parameters())
    feats = {k: v[:1].expand(2, -1, -1, -1) for k, v in features(1).items()}
    out = model(feats, torch.tensor([0, NUM_VIEWS]))
    torch.testing.assert_close(out[0], out[1])
