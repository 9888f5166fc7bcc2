import dataclasses
import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, subprocess_env
from PIL import Image

from pipeline.cache.store import FeatureCache
from pipeline.config import ExtractConfig, TrainConfig
from pipeline.data.augment import (
    FLIPS,
    VERSION,
    CopyPlan,
    RandomTransform,
    augmented_key,
    auto_copies,
    extraction_jobs,
    transform_image,
    transform_mask,
)
from pipeline.data.images import read_image, read_mask, sam3_resize, sam3_transform
from pipeline.data.manifest import read_manifest, sample_keys, write_manifest
from pipeline.data.samples import SegmentationSamples, ViewVocabulary, resize_mask
from pipeline.distributed import DistributedContext
from pipeline.extraction import run_extraction
from pipeline.model.backbone import build_backbone
from pipeline.train.launch import train
from pipeline.train.run_data import RunData
from pipeline.train.setup import MissingFeaturesError, prepare

KEYS = [hashlib.sha256(bytes([i])).hexdigest() for i in range(4)]


def _blobs(height=48, width=40, seed=0) -> np.ndarray:
    """(H, W) bool: a few discs and a line, off-centre, so every flip and rotation moves them."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    mask = np.zeros((height, width), bool)
    for _ in range(4):
        cy, cx, r = rng.uniform(4, height - 4), rng.uniform(4, width - 4), rng.uniform(2, 6)
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
    mask[5, 3 : width // 2] = True
    return mask


def _encoding(mask: np.ndarray) -> torch.Tensor:
    """(3, H, W) uint8 whose every channel is the mask: 255 inside, 0 outside."""
    return torch.from_numpy(np.repeat(mask[None].astype(np.uint8) * 255, 3, axis=0))


@pytest.mark.parametrize("name", FLIPS)
def test_fixed_flips_agree_on_mask_and_image(name):
    mask = _blobs()
    assert np.array_equal(transform_image(name, _encoding(mask))[0].numpy() > 0,
                          transform_mask(name, mask))
    assert not np.array_equal(transform_mask(name, mask), mask)
    image = _encoding(mask)
    assert transform_image(None, image) is image and transform_mask(None, mask) is mask


def test_plans_are_bounded():
    assert CopyPlan("flips", 2).names(KEYS[0]) == ("hflip", "vflip")
    assert len(CopyPlan("random", 32).names(KEYS[0])) == 32
    with pytest.raises(ValueError, match="between 0 and 5 with --augment flips"):
        CopyPlan("flips", 6)
    with pytest.raises(ValueError, match="between 0 and 32 with --augment random"):
        CopyPlan("random", 33)
    with pytest.raises(ValueError, match="--augment must be one of"):
        CopyPlan("elastic", 1)


def test_random_names_follow_from_key_copy_and_seed():
    plan = CopyPlan("random", 6, seed=0)
    names = plan.names(KEYS[0])
    assert names == plan.names(KEYS[0])
    assert len(set(names)) == 6 and all(n.startswith(f"{VERSION}:") for n in names)
    assert CopyPlan("random", 9, seed=0).names(KEYS[0])[:6] == names  # more copies keep these
    assert set(CopyPlan("random", 6, seed=1).names(KEYS[0])).isdisjoint(names)
    assert set(plan.names(KEYS[1])).isdisjoint(names)
    for name in names:
        transform = RandomTransform.parse(name)
        assert transform.name() == name  # the name holds every parameter, exactly
    with pytest.raises(ValueError, match="not an aug-v1 transform"):
        RandomTransform.parse("aug-v1:h1,v0")


def test_draws_cover_the_distribution():
    transforms = [RandomTransform.parse(n) for k in KEYS for n in CopyPlan("random", 16).names(k)]
    for field, low, high in [("angle", -30, 30), ("scale", 0.8, 1.25), ("gamma", 0.75, 1.33),
                             ("contrast", 0.75, 1.33), ("brightness", -0.1, 0.1)]:
        values = np.array([getattr(t, field) for t in transforms])
        assert values.min() >= low and values.max() <= high
        assert values.max() - values.min() > 0.6 * (high - low)
    for field in ("hflip", "vflip"):
        assert 0.3 < np.mean([getattr(t, field) for t in transforms]) < 0.7
    assert 0.3 < np.mean([t.noise > 0 for t in transforms]) < 0.7


def test_every_copy_moves_mask_and_image_together():
    """The image encodes the mask; after each copy's transform (photometry included) every mask
    pixel is at least as bright as every background pixel, and without photometry the image
    thresholded at half is the mask."""
    mask = _blobs()
    for key in KEYS:
        for name in CopyPlan("random", 8).names(key):
            transform = RandomTransform.parse(name)
            moved = transform.mask(mask)
            assert moved.sum() > 0.5 * mask.sum() and not np.array_equal(moved, mask)
            geometric = dataclasses.replace(transform, brightness=0.0, contrast=1.0, gamma=1.0,
                                            noise=0.0)
            image = geometric.image(_encoding(mask))
            assert (image[0].numpy() >= 128).tolist() == moved.tolist()
            if not transform.noise:
                full = transform_image(name, _encoding(mask))[0].numpy()
                assert full[moved].min() >= full[~moved].max()


def test_geometry_of_a_pure_flip_is_exact():
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 30, 20), np.uint8))
    identity = RandomTransform(False, False, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0)
    assert torch.equal(identity.image(image), image)
    both = dataclasses.replace(identity, hflip=True, vflip=True)
    assert torch.equal(both.image(image), image.flip(-1).flip(-2))
    assert np.array_equal(both.mask(_blobs(30, 20)), _blobs(30, 20)[::-1, ::-1])
    sixteen = torch.from_numpy(np.random.default_rng(1).integers(0, 65536, (3, 8, 8), np.uint16))
    assert identity.image(sixteen).dtype == torch.uint16


_CHILD = """
import hashlib, sys
import numpy as np, torch
from pipeline.data.augment import CopyPlan, transform_image, transform_mask
image = torch.from_numpy(np.random.default_rng(7).integers(0, 256, (3, 50, 60), np.uint8))
mask = np.random.default_rng(8).random((50, 60)) < 0.3
for name in CopyPlan("random", 3, seed=5).names(sys.argv[1]):
    out = transform_image(name, image).numpy().tobytes() + transform_mask(name, mask).tobytes()
    print(name, hashlib.sha256(out).hexdigest())
"""


def test_copies_are_bit_identical_in_another_process():
    image = torch.from_numpy(np.random.default_rng(7).integers(0, 256, (3, 50, 60), np.uint8))
    mask = np.random.default_rng(8).random((50, 60)) < 0.3
    here = []
    for name in CopyPlan("random", 3, seed=5).names(KEYS[2]):
        first = transform_image(name, image).numpy().tobytes()
        assert transform_image(name, image).numpy().tobytes() == first
        digest = hashlib.sha256(first + transform_mask(name, mask).tobytes()).hexdigest()
        here.append(f"{name} {digest}")
    assert len({line.split()[1] for line in here}) == 3  # the copies differ
    child = subprocess.run([sys.executable, "-c", _CHILD, KEYS[2]], cwd=REPO, check=True,
                           env=subprocess_env(), capture_output=True, text=True)
    assert child.stdout.split("\n")[:3] == here


def _encoded_dataset(folder, n=6):
    """Images that encode their masks (bright inside), half train; returns the manifest."""
    (folder / "img").mkdir(parents=True)
    rows = []
    for i in range(n):
        mask = _blobs(40, 36, seed=i)
        Image.fromarray(mask.astype(np.uint8) * 200 + 20).save(folder / "img" / f"{i}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "img" / f"{i}-mask.png")
        rows.append({"image": folder / "img" / f"{i}.png", "mask": folder / "img" / f"{i}-mask.png",
                     "view": "AP", "split": "val" if i % 3 == 2 else "train"})
    return write_manifest(folder / "manifest.csv", rows)


def test_training_samples_draw_a_copy_per_epoch_with_its_mask(tmp_path):
    samples = [s for s in read_manifest(_encoded_dataset(tmp_path)) if s.split == "train"]
    names = [CopyPlan("random", 2).names(k) for k in sample_keys(samples)]
    dataset = SegmentationSamples(samples, resolution=32, augment=names,
                                  views=ViewVocabulary.from_samples(samples))
    drawn = set()
    for epoch in range(12):
        dataset.epoch = epoch
        item = dataset[1]
        copy = int(item["copy"])
        name = names[1][copy - 1] if copy else None
        drawn.add(copy)
        assert torch.equal(item["mask"], resize_mask(
            transform_mask(name, read_mask(samples[1].mask)[0]), 32))
        assert torch.equal(item["image"], sam3_resize(32)(
            transform_image(name, read_image(samples[1].image))))
        assert torch.equal(dataset[1]["image"], item["image"])  # deterministic per epoch
    assert drawn == {0, 1, 2}


def test_only_training_images_get_copies(dataset):
    samples = read_manifest(dataset)
    keys = sample_keys(samples)
    jobs = extraction_jobs(samples, keys, CopyPlan("random", 3))
    train_keys = [k for s, k in zip(samples, keys, strict=True) if s.split == "train"]
    assert len(jobs) == len(samples) + 3 * len(train_keys)
    name = CopyPlan("random", 3).names(train_keys[0])[2]
    assert jobs[augmented_key(train_keys[0], name)][1] == name


def test_stage_a_extracts_the_copies_stage_b_reads(dataset, tmp_path):
    samples = read_manifest(dataset)
    common = dict(data=str(dataset), backbone="tiny", cache_dir=str(tmp_path / "c"),
                  augment_seed=3)
    summary = run_extraction(ExtractConfig(loader_workers=0, augment_copies=2, **common),
                             samples, sample_keys(samples))
    n_train = sum(s.split == "train" for s in samples)
    assert (summary.total, summary.extracted) == (len(samples) + 2 * n_train,) * 2
    more = run_extraction(ExtractConfig(loader_workers=0, augment_copies=3, **common),
                          samples, sample_keys(samples))
    assert (more.extracted, more.reused) == (n_train, summary.total)  # the first two are kept
    prepared = prepare(TrainConfig(run_dir=str(tmp_path / "run"), augment_copies=3, **common))
    data = RunData(prepared, prepared.cache, DistributedContext())
    cache = FeatureCache.open(more.path)
    keys = np.asarray(cache.keys())
    read = set(keys[data.rows["train"].ravel()]) | set(keys[data.rows["val"].ravel()])
    assert read == set(keys) and data.rows["train"].shape == (n_train, 4)

    first = next(s for s in samples if s.split == "train")
    name = CopyPlan("random", 3, seed=3).names(sample_keys([first])[0])[1]
    row = int(cache.rows_for([augmented_key(sample_keys([first])[0], name)])[0])
    copied = sam3_transform(252)(transform_image(name, read_image(first.image)))
    with torch.inference_mode():
        expected = build_backbone("tiny").forward_image(copied[None])["vision_features"][0]
    np.testing.assert_allclose(cache.read(row)["1x"], expected.numpy(), rtol=1e-3, atol=2e-3)
    original = cache.read(int(cache.rows_for(sample_keys([first]))[0]))["1x"]
    assert np.abs(original.astype(np.float32) - cache.read(row)["1x"]).max() > 1e-2


def test_training_with_copies_needs_them_extracted_then_trains(dataset, tmp_path):
    common = dict(data=str(dataset), backbone="tiny", cache_dir=str(tmp_path / "c"),
                  epochs=1, batch_size=4, e2e_every=0, loader_workers=0, overlays=0,
                  augment_copies=2, augment_seed=4)
    samples = read_manifest(dataset)
    run_extraction(ExtractConfig(data=str(dataset), backbone="tiny", cache_dir=str(tmp_path / "c"),
                                 loader_workers=0), samples, sample_keys(samples))
    with pytest.raises(MissingFeaturesError, match="--augment-copies 2 --augment-seed 4"):
        train(TrainConfig(run_dir=str(tmp_path / "a"), **common))
    run = train(TrainConfig(run_dir=str(tmp_path / "b"), extract_missing=True, **common))
    assert (run / "report.json").is_file()
    import json

    saved = json.loads((run / "config.json").read_text())
    assert saved["augment_version"] == VERSION
    assert (saved["config"]["augment"], saved["config"]["augment_seed"]) == ("random", 4)


@pytest.mark.parametrize("train_images, copies", [
    (0, 0), (1, 4), (14, 4), (100, 4), (101, 4), (125, 3), (250, 1), (499, 1), (500, 0),
    (50_000, 0)])
def test_automatic_copies_shrink_with_the_training_set(train_images, copies):
    assert auto_copies(train_images) == copies


def test_without_a_count_both_stages_agree_on_the_automatic_copies(dataset, tmp_path):
    samples = read_manifest(dataset)
    n_train = sum(s.split == "train" for s in samples)
    common = dict(data=str(dataset), backbone="tiny", cache_dir=str(tmp_path / "c"))
    config = ExtractConfig(loader_workers=0, **common)
    assert config.augment_copies is None
    assert config.with_copies_for(samples).augment_copies == auto_copies(n_train) == 4
    assert ExtractConfig(augment_copies=1, **common).with_copies_for(samples).augment_copies == 1
    held = [dataclasses.replace(s, split="test") for s in samples if s.split == "train"]
    assert config.with_copies_for(held).augment_copies == 0  # test and val rows do not count
    summary = run_extraction(config, samples, sample_keys(samples))
    assert summary.extracted == len(samples) + 4 * n_train
    prepared = prepare(TrainConfig(run_dir=str(tmp_path / "run"), **common))  # no extraction
    assert prepared.config.augment_copies == 4
    import json

    saved = json.loads((prepared.run_dir / "config.json").read_text())
    assert saved["config"]["augment_copies"] == 4
