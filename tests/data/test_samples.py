import dataclasses
import pickle
import warnings

import numpy as np
import pytest
import torch
from conftest import make_dataset
from torch.utils.data import DataLoader, default_collate

from pipeline.data.manifest import read_manifest
from pipeline.data.samples import (
    SMALL_FIELDS,
    SegmentationSamples,
    ViewVocabulary,
    collate_samples,
    to_device,
)


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


def test_decoded_samples_serve_the_same_items_without_reading_the_files_again(tmp_path):
    from pipeline.data.samples import DecodedSamples

    samples = read_manifest(make_dataset(tmp_path / "d", 4, size=32))
    views = ViewVocabulary.from_samples(samples)
    memory = DecodedSamples()
    kept = SegmentationSamples(samples, resolution=32, views=views, memory=memory,
                               augment=[("hflip",)] * 4)
    first = [kept.item(i, c) for i in range(4) for c in (0, 1)]
    for path in {s.image for s in samples} | {s.mask for s in samples}:
        path.unlink()  # from now on only memory can serve them
    again = [kept.item(i, c) for i in range(4) for c in (0, 1)]
    assert len(memory.items) == 8
    for a, b in zip(first, again, strict=True):
        assert a.keys() == b.keys() and a["mask"].dtype == torch.float32
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert DecodedSamples.fits(1000, 252, 2048) and not DecodedSamples.fits(10**6, 1008, 2048)


def test_decoded_items_equal_decoding_from_the_files(tmp_path):
    from pipeline.data.samples import DecodedSamples

    samples = read_manifest(make_dataset(tmp_path / "d", 4, size=32))
    views = ViewVocabulary.from_samples(samples)
    kept = SegmentationSamples(samples, resolution=32, views=views, memory=DecodedSamples(),
                               augment=[("rot90",)] * 4)
    fresh = SegmentationSamples(samples, resolution=32, views=views, augment=[("rot90",)] * 4)
    for i in range(4):
        for copy in (0, 1):
            a, b = kept.item(i, copy), fresh.item(i, copy)
            assert a.keys() == b.keys()
            for key in a:
                assert torch.equal(a[key], b[key]), (i, copy, key)


def test_epoch_reaches_persistent_workers(tmp_path):
    samples = read_manifest(make_dataset(tmp_path / "d", 4, size=32))
    dataset = SegmentationSamples(samples, resolution=32, views=ViewVocabulary.from_samples(
        samples), augment=[("hflip", "vflip", "rot90")] * 4, with_image=False)
    loader = DataLoader(dataset, batch_size=4, num_workers=1, persistent_workers=True,
                        collate_fn=collate_samples)
    for epoch in (0, 7):
        dataset.epoch = epoch
        expected = [int(np.random.default_rng((0, epoch, i)).integers(4)) for i in range(4)]
        assert next(iter(loader))["copy"].tolist() == expected


def test_rows_without_a_view_are_named_when_the_model_learnt_views(tmp_path):
    samples = read_manifest(make_dataset(tmp_path, 4))  # views LAO, RAO
    views = ViewVocabulary.from_samples(samples)
    bare = [dataclasses.replace(s, view=None) for s in samples]
    with pytest.warns(UserWarning, match=r"new\.csv: 4 of 4 rows have no view, and the model "
                      r"learnt views \['LAO', 'RAO'\]: those rows use the unknown-view"):
        views.warn_unseen(bare, "new.csv")
    typo = [dataclasses.replace(s, view="LOA") for s in samples]
    with pytest.warns(UserWarning, match=r"new\.csv: views \['LOA'\] were not seen in training "
                      r"\(it learnt \['LAO', 'RAO'\]\); they use the unknown-view embedding "
                      r"\('LOA': did you mean 'LAO'\?\)"):
        views.warn_unseen(typo, "new.csv")
    single = ViewVocabulary.from_samples(bare)  # trained without views: nothing to say
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        single.warn_unseen(bare, "new.csv")
