import threading
import time

import numpy as np
import pytest
import torch
from conftest import make_dataset
from torch.utils.data import DataLoader

from pipeline.cache.feature_batches import FeatureBatches
from pipeline.cache.store import CacheError, FeatureCache
from pipeline.data.manifest import read_manifest
from pipeline.data.samples import SegmentationSamples, ViewVocabulary, collate_samples

SIGNATURE = {"backbone": "tiny", "resolution": 32, "levels": ["1x", "2x"], "amp": "off",
             "checkpoint_sha256": None, "adapter_sha256": None}
SHAPES = {"1x": (4, 3, 3), "2x": (4, 6, 6)}


def _value(row: int, level: str) -> np.ndarray:
    shape = SHAPES[level]
    return (np.arange(np.prod(shape)).reshape(shape) + 1000 * row).astype(np.float16)


@pytest.fixture
def cached(tmp_path):
    """8 samples with one augmented copy each: rows[i] = (row of i, row of its copy); every
    row's features are `_value(row, level)`, except row 5, written as zeros (no chunk file)."""
    samples = read_manifest(make_dataset(tmp_path / "d", 8, size=32))
    cache = FeatureCache.create_or_open(tmp_path / "cache", SIGNATURE, SHAPES)
    rows = cache.add_keys([f"{i}{c}" for i in range(8) for c in "ab"]).reshape(8, 2)
    for row in rows.ravel():
        if row == 5:  # through zarr, which writes no file for a chunk of fill values
            for lvl in SHAPES:
                cache.level(lvl)[5] = np.zeros(SHAPES[lvl], np.float16)
        else:
            cache.write_sample(int(row), {lvl: _value(row, lvl) for lvl in SHAPES})
    assert not (cache.path / "features/1x/c/5").exists()
    return samples, cache, rows


def _batches(samples, cache, rows, *, workers=0, levels=("1x", "2x"), batch_size=3):
    dataset = SegmentationSamples(samples, resolution=32, with_image=False,
                                  views=ViewVocabulary.from_samples(samples),
                                  augment=[("hflip",)] * len(samples))
    dataset.epoch = 3
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=True,
                        generator=torch.Generator().manual_seed(0), collate_fn=collate_samples)
    return FeatureBatches(loader, cache_path=cache.path, rows=rows, levels=levels,
                          samples=samples, pin_memory=False, threads=3)


@pytest.mark.parametrize("workers", [0, 2])
def test_each_batch_gets_the_rows_of_its_samples_and_copies(cached, workers):
    samples, cache, rows = cached
    batches = _batches(samples, cache, rows, workers=workers)
    seen, copies = [], set()
    assert len(batches) == 3
    for batch in batches:
        for j, (i, copy) in enumerate(zip(batch["index"].tolist(), batch["copy"].tolist(),
                                          strict=True)):
            row = int(rows[i, copy])
            for lvl in SHAPES:
                expected = _value(row, lvl) * (row != 5)
                np.testing.assert_array_equal(batch["features"][lvl][j].numpy(), expected)
                assert batch["features"][lvl].dtype == torch.float16
            seen.append(i)
            copies.add(copy)
    assert sorted(seen) == list(range(8)) and copies == {0, 1}


@pytest.mark.parametrize("workers", [0, 2])
def test_buffers_are_reused_only_after_the_caller_has_moved_on(cached, workers):
    """8 batches of one sample through a ring of AHEAD + 2 buffers: each batch holds its own
    values when the caller gets it, even while the caller is slow and the producer is ahead."""
    samples, cache, rows = cached
    addresses = set()
    for batch in _batches(samples, cache, rows, workers=workers, batch_size=1):
        time.sleep(0.02)  # the producer fills every free buffer meanwhile
        row = int(rows[int(batch["index"][0]), int(batch["copy"][0])])
        for lvl in SHAPES:
            np.testing.assert_array_equal(batch["features"][lvl][0].numpy(),
                                          _value(row, lvl) * (row != 5))
        addresses.add(batch["features"]["1x"].data_ptr())
    assert len(addresses) == FeatureBatches.AHEAD + 2


def test_only_the_requested_levels_are_read(cached):
    samples, cache, rows = cached
    batch = next(iter(_batches(samples, cache, rows, levels=("2x",))))
    assert list(batch["features"]) == ["2x"] and batch["features"]["2x"].shape == (3, 4, 6, 6)


def test_a_damaged_chunk_names_the_image_and_the_repair(cached):
    samples, cache, rows = cached
    chunk = cache.path / f"features/2x/c/{rows[4, 0]}/0/0/0"
    data = bytearray(chunk.read_bytes())
    data[7] ^= 1
    chunk.write_bytes(bytes(data))
    loader = _batches(samples, cache, np.repeat(rows[:, :1], 2, axis=1))  # originals only
    with pytest.raises(CacheError, match=rf"{samples[4].image.name} \(row {rows[4, 0]}\).*"
                                         r"crc32c.*sam3-vessel cache verify"):
        list(loader)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_caller_that_stops_early_leaves_no_producer_behind(cached, workers):
    samples, cache, rows = cached
    batches = iter(_batches(samples, cache, rows, workers=workers))
    first = next(batches)
    assert first["features"]["1x"].shape == (3, 4, 3, 3)
    batches.close()  # as when an epoch stops after --e2e-steps
    assert not [t for t in threading.enumerate() if t.name == "feature-batches"]
