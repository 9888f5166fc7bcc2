import pickle

import numpy as np
import torch
from conftest import make_dataset
from torch.utils.data import DataLoader, default_collate

from pipeline.datasets import (
    SMALL_FIELDS,
    SegmentationSamples,
    ViewVocabulary,
    collate_samples,
    to_device,
)
from pipeline.manifest import read_manifest


def _samples(tmp_path):
    samples = read_manifest(make_dataset(tmp_path / "d", 6, size=32))
    return SegmentationSamples(samples, resolution=32, views=ViewVocabulary.from_samples(samples))


def test_small_fields_cross_as_numpy_and_reach_the_model_as_the_default_collate_makes_them(
        tmp_path):
    dataset = _samples(tmp_path)
    items = [dataset[i] for i in range(4)]
    batch, reference = collate_samples(items), default_collate(items)
    assert set(batch) == set(reference)
    for key in SMALL_FIELDS:
        assert isinstance(batch[key], np.ndarray)
    assert isinstance(batch["mask"], torch.Tensor) and isinstance(batch["image"], torch.Tensor)
    moved = to_device(batch, torch.device("cpu"))
    for key, value in reference.items():
        assert moved[key].dtype == value.dtype and torch.equal(moved[key], value), key
    # Inline in the pickle: no shared-memory file per field.
    assert all(batch[key].dtype != object and b"torch" not in pickle.dumps(batch[key])
               for key in SMALL_FIELDS)


def test_batches_from_worker_processes_equal_the_in_process_ones(tmp_path):
    dataset = _samples(tmp_path)
    inline = list(DataLoader(dataset, batch_size=4, collate_fn=collate_samples))
    forked = list(DataLoader(dataset, batch_size=4, collate_fn=collate_samples, num_workers=2))
    for a, b in zip(inline, forked, strict=True):
        assert a.keys() == b.keys()
        assert all(isinstance(b[key], np.ndarray) for key in SMALL_FIELDS)
        for key in a:
            np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))
