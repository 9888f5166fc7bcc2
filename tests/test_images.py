import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.datasets import SegmentationSamples, ViewVocabulary
from pipeline.images import (
    load_preprocessed,
    normalize,
    read_image,
    sam3_resize,
    sam3_transform,
)
from pipeline.manifest import read_manifest


@pytest.mark.parametrize("mode", ["RGB", "I;16", "L", "RGBA"])
def test_resize_then_normalize_is_sam3_transform_bit_for_bit(tmp_path, mode):
    rng = np.random.default_rng(0)
    if mode == "I;16":
        picture = Image.fromarray(rng.integers(0, 65535, (61, 47), dtype=np.uint16))
    else:
        channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
        values = rng.integers(0, 255, (61, 47, channels), dtype=np.uint8)
        picture = Image.fromarray(values.squeeze(-1) if channels == 1 else values, mode)
    path = tmp_path / "x.png"
    picture.save(path)
    image = read_image(path)
    resized = sam3_resize(40)(image)
    assert resized.dtype == torch.uint8 and resized.shape == (3, 40, 40)
    assert torch.equal(normalize(resized), sam3_transform(40)(image))
    assert torch.equal(normalize(resized[None])[0], load_preprocessed(path, 40))


def test_normalize_takes_only_the_uint8_half():
    with pytest.raises(TypeError, match="uint8 output of sam3_resize"):
        normalize(torch.zeros(3, 4, 4))


def test_training_samples_ship_uint8_images(dataset):
    samples = read_manifest(dataset)
    data = SegmentationSamples(samples, resolution=64, views=ViewVocabulary.from_samples(samples))
    item = data[0]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 64, 64)
    assert torch.equal(normalize(item["image"]), load_preprocessed(samples[0].image, 64))
