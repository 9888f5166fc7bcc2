import numpy as np
import pytest
import torch

from pipeline.augment import AUGMENTATIONS, apply, augmented_key, copies, extraction_jobs
from pipeline.backbone import build_backbone
from pipeline.cache import FeatureCache
from pipeline.config import ExtractConfig, TrainConfig
from pipeline.datasets import SegmentationSamples, ViewVocabulary
from pipeline.extraction import run_extraction
from pipeline.images import read_image, sam3_transform
from pipeline.manifest import read_manifest, sample_keys
from pipeline.training import MissingFeaturesError, train


@pytest.mark.parametrize("name", AUGMENTATIONS)
def test_numpy_and_torch_agree(name):
    x = np.arange(12).reshape(1, 3, 4)
    np.testing.assert_array_equal(apply(name, x), apply(name, torch.from_numpy(x)).numpy())
    assert apply(None, x) is x


def test_copies_are_bounded():
    assert copies(2) == ("hflip", "vflip")
    with pytest.raises(ValueError, match="between 0 and 5"):
        copies(6)


def test_only_training_images_get_copies(dataset):
    samples = read_manifest(dataset)
    keys = sample_keys(samples)
    jobs = extraction_jobs(samples, keys, 2)
    train = [k for s, k in zip(samples, keys, strict=True) if s.split == "train"]
    assert len(jobs) == len(samples) + 2 * len(train)
    assert jobs[augmented_key(train[0], "vflip")][1] == "vflip"


def test_extracted_copies_are_features_of_the_flipped_image(dataset, tmp_path):
    samples = read_manifest(dataset)
    config = ExtractConfig(data=str(dataset), backbone="tiny", cache_dir=str(tmp_path / "c"),
                           loader_workers=0, augment_copies=1)
    summary = run_extraction(config, samples, sample_keys(samples))
    n_train = sum(s.split == "train" for s in samples)
    assert summary.total == len(samples) + n_train
    first = next(s for s in samples if s.split == "train")
    key = augmented_key(sample_keys([first])[0], "hflip")
    cache = FeatureCache.open(summary.path)
    flipped = sam3_transform(252)(read_image(first.image).flip(-1))
    with torch.inference_mode():
        expected = build_backbone("tiny").forward_image(flipped[None])["vision_features"][0]
    np.testing.assert_allclose(cache.read(int(cache.rows_for([key])[0]))["1x"],
                               expected.numpy(), rtol=1e-3, atol=2e-3)


def test_draws_flip_mask_and_image_together_and_change_with_epoch(dataset):
    samples = [s for s in read_manifest(dataset) if s.split == "train"]
    views = ViewVocabulary.from_samples(samples)
    plain = SegmentationSamples(samples, resolution=64, views=views)
    augmented = SegmentationSamples(samples, resolution=64, views=views, augment=("hflip",))
    draws = set()
    for epoch in range(6):
        augmented.epoch = epoch
        item = augmented[0]
        flipped = torch.equal(item["mask"], plain[0]["mask"].flip(-1))
        same = torch.equal(item["mask"], plain[0]["mask"])
        assert flipped or same
        if flipped:
            assert torch.equal(item["image"], plain[0]["image"].flip(-1))
        draws.add(flipped)
        assert torch.equal(augmented[0]["mask"], item["mask"])  # deterministic per epoch
    assert draws == {True, False}


def test_training_with_copies_needs_them_extracted_then_trains(dataset, tmp_path):
    common = dict(data=str(dataset), backbone="tiny", cache_dir=str(tmp_path / "c"),
                  epochs=1, batch_size=4, e2e_every=0, loader_workers=0, overlays=0,
                  augment_copies=2)
    samples = read_manifest(dataset)
    run_extraction(ExtractConfig(data=str(dataset), backbone="tiny", cache_dir=str(tmp_path / "c"),
                                 loader_workers=0), samples, sample_keys(samples))
    with pytest.raises(MissingFeaturesError, match="--augment-copies 2"):
        train(TrainConfig(run_dir=str(tmp_path / "a"), **common))
    run = train(TrainConfig(run_dir=str(tmp_path / "b"), extract_missing=True, **common))
    assert (run / "report.json").is_file()
