"""The folder importer: pairing, views and angles, splits (real files, no mocks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from pipeline.data.importers import (
    DatasetImportError,
    encode_angles,
    import_folder,
    parse_angles,
)
from pipeline.data.manifest import read_manifest


def _png(path: Path, value: int = 0, size: tuple[int, int] = (12, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.full(size, value, dtype=np.uint8)
    array[2:5, 3:9] = 255 - value
    Image.fromarray(array).save(path)
    return path


def test_drive_layout_paired_by_regex(tmp_path):
    for number in (21, 22, 23):
        path = tmp_path / "images" / f"{number}_training.tif"
        path.parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(path, np.full((12, 16, 3), number, dtype=np.uint8))
        mask = np.zeros((12, 16), dtype=np.uint8)
        mask[number % 5:, :] = 255
        gif = tmp_path / "masks" / f"{number}_manual1.gif"
        gif.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(gif)
    _png(tmp_path / "masks" / "21_training_mask.png")  # a FOV mask the regex must skip
    out = import_folder(tmp_path / "images", tmp_path / "manifest.csv",
                        masks_dir=tmp_path / "masks", image_regex=r"(\d+)_training",
                        mask_regex=r"(\d+)_manual1")
    samples = read_manifest(out)
    assert [s.image.name for s in samples] == [f"{n}_training.tif" for n in (21, 22, 23)]
    assert [s.mask.name for s in samples] == [f"{n}_manual1.gif" for n in (21, 22, 23)]
    assert {s.split for s in samples} == {"train", "val"}
    assert all(s.view is None and s.angles is None for s in samples)


def test_fields_of_view_paired_by_regex(tmp_path):
    for number in (21, 22):  # DRIVE's layout: images/, 1st_manual/ and mask/ (the FOV)
        _png(tmp_path / "images" / f"{number}_training.png")
        _png(tmp_path / "1st_manual" / f"{number}_manual1.png")
        _png(tmp_path / "mask" / f"{number}_training_mask.png", value=255)
    common = dict(masks_dir=tmp_path / "1st_manual", image_regex=r"(\d+)_training",
                  mask_regex=r"(\d+)_manual1")
    out = import_folder(tmp_path / "images", tmp_path / "m.csv", fov_dir=tmp_path / "mask",
                        fov_regex=r"(\d+)_training_mask", **common)
    samples = read_manifest(out)
    assert [(s.image.name, s.fov.name) for s in samples] == [
        ("21_training.png", "21_training_mask.png"), ("22_training.png", "22_training_mask.png")]
    assert "fov" in out.read_text().splitlines()[0].split(",")
    _png(tmp_path / "images" / "23_training.png")
    with pytest.raises(DatasetImportError, match=r"(?s)without a field-of-view.*23_training"):
        import_folder(tmp_path / "images", tmp_path / "m.csv", fov_dir=tmp_path / "mask",
                      fov_regex=r"(\d+)_training_mask", allow_missing_masks=True, **common)
    without = read_manifest(import_folder(tmp_path / "images", tmp_path / "n.csv",
                                          allow_missing_masks=True, **common))
    assert all(s.fov is None for s in without)
    assert "fov" not in (tmp_path / "n.csv").read_text().splitlines()[0]


def test_fields_of_view_inside_the_image_folder_are_not_images(tmp_path):
    _png(tmp_path / "images" / "a.png")
    _png(tmp_path / "images" / "fov" / "a.png", value=255)
    out = import_folder(tmp_path / "images", tmp_path / "m.csv",
                        fov_dir=tmp_path / "images" / "fov")
    assert [(s.image.name, s.fov.parent.name) for s in read_manifest(out)] == [("a.png", "fov")]


def test_missing_masks_listed_or_allowed(tmp_path):
    _png(tmp_path / "images" / "a.png")
    _png(tmp_path / "images" / "b.png")
    _png(tmp_path / "masks" / "a.png")
    with pytest.raises(DatasetImportError, match=r"(?s)without a mask.*b\.png") as raised:
        import_folder(tmp_path / "images", tmp_path / "m.csv", masks_dir=tmp_path / "masks")
    title = str(raised.value).splitlines()[0]  # the flags to type, and the keys masks gave
    assert title == (f"images without a mask in {tmp_path / 'masks'} (its keys: 'a'); a key is "
                     "the file stem, or the first group of --image-regex / --mask-regex: give "
                     "those when the names differ, or --allow-missing-masks to keep these "
                     "images without a mask (1):")
    out = import_folder(tmp_path / "images", tmp_path / "m.csv", masks_dir=tmp_path / "masks",
                        allow_missing_masks=True)
    masks = {s.image.name: s.mask for s in read_manifest(out)}
    assert masks["a.png"].name == "a.png" and masks["b.png"] is None


def test_views_from_subfolders_pair_same_stems(tmp_path):
    for view in ("LAO", "RAO"):
        _png(tmp_path / "data" / view / "001.png")
        _png(tmp_path / "data" / view / f"{view.lower()}_only.png")
        _png(tmp_path / "data" / "masks" / view / "001.png", value=255 if view == "RAO" else 0)
        _png(tmp_path / "data" / "masks" / view / f"{view.lower()}_only.png")
    out = import_folder(tmp_path / "data", tmp_path / "m.csv",
                        masks_dir=tmp_path / "data" / "masks", view_from_subfolder=True)
    samples = read_manifest(out)
    assert len(samples) == 4  # the masks folder inside the images folder is not imported
    for sample in samples:
        assert sample.view == sample.image.parent.name
        assert sample.mask.parent.name == sample.view and sample.mask.name == sample.image.name


def test_c_arm_angles_from_names(tmp_path):
    names = ["p1_LAO44_CRA29.png", "p1_RAO30_CAU20.png", "p2_LAO12.5-CAU3.png", "p2_plain.png"]
    for name in names:
        _png(tmp_path / "images" / name)
    out = import_folder(tmp_path / "images", tmp_path / "m.csv", split_ratio=None)
    rows = {s.image.name: s for s in read_manifest(out)}
    assert rows["p1_LAO44_CRA29.png"].angles == (44.0, 29.0)
    assert rows["p1_LAO44_CRA29.png"].view == "LAO_CRA"
    assert rows["p1_RAO30_CAU20.png"].angles == (-30.0, -20.0)
    assert rows["p1_RAO30_CAU20.png"].view == "RAO_CAU"
    assert rows["p2_LAO12.5-CAU3.png"].angles == (12.5, -3.0)
    assert rows["p2_plain.png"].angles is None and rows["p2_plain.png"].view is None
    assert all(s.split is None for s in rows.values())
    out = import_folder(tmp_path / "images", tmp_path / "m.csv", view_regex=r"LAO|RAO")
    rows = {s.image.name: s for s in read_manifest(out)}
    assert rows["p1_RAO30_CAU20.png"].view == "RAO"
    assert rows["p1_RAO30_CAU20.png"].angles == (-30.0, -20.0)
    assert parse_angles("RAO5") == (-5.0, 0.0)


def test_grouped_split_never_splits_a_patient(tmp_path):
    counts = {"P01": 1, "P02": 4, "P03": 2, "P04": 3, "P05": 1, "P06": 2, "P07": 5}
    for patient, count in counts.items():
        for index in range(count):
            _png(tmp_path / "images" / f"{patient}_img{index}.png")
    for seed in range(8):
        out = import_folder(tmp_path / "images", tmp_path / f"m{seed}.csv",
                            group_regex=r"^(P\d+)_", seed=seed)
        by_patient: dict[str, set] = {}
        for sample in read_manifest(out):
            by_patient.setdefault(sample.image.name[:3], set()).add(sample.split)
        assert all(len(splits) == 1 for splits in by_patient.values()), by_patient
        assert set().union(*by_patient.values()) == {"train", "val"}
    with pytest.raises(DatasetImportError, match="group regex"):
        import_folder(tmp_path / "images", tmp_path / "m.csv", group_regex=r"^(Q\d+)_")


def test_ratio_split_is_seeded(tmp_path):
    for index in range(10):
        _png(tmp_path / "images" / f"{index:02d}.png")

    def splits(seed):
        out = import_folder(tmp_path / "images", tmp_path / "m.csv", seed=seed, split_ratio=0.7)
        return [s.split for s in read_manifest(out)]

    assert splits(3) == splits(3)
    assert splits(3).count("train") == 7
    assert any(splits(seed) != splits(3) for seed in range(4, 9))
    out = import_folder(tmp_path / "images", tmp_path / "m.csv", split_column="test")
    assert {s.split for s in read_manifest(out)} == {"test"}


def test_encode_angles():
    code = encode_angles(90.0, -30.0)
    assert code.shape == (4,) and code.dtype == np.float32
    np.testing.assert_allclose(code, [1.0, 0.0, -0.5, np.sqrt(3) / 2], atol=1e-6)


def test_dicom_images_in_a_folder_take_their_header_angles(tmp_path):
    from dicom_files import write_xa

    frame = np.zeros((12, 16), np.uint8)
    write_xa(tmp_path / "images" / "a.dcm", frame, angles=(-29.0, 21.0))
    write_xa(tmp_path / "images" / "IM0002", frame, angles=None)
    write_xa(tmp_path / "images" / "c_LAO10.dcm", frame, angles=(44.0, 0.0))  # the name wins
    _png(tmp_path / "images" / "d.png")
    samples = read_manifest(import_folder(tmp_path / "images", tmp_path / "m.csv"))
    by_name = {s.image.name: (s.angles, s.view) for s in samples}
    assert by_name == {"a.dcm": ((-29.0, 21.0), "RAO30_CRA20"), "IM0002": (None, None),
                       "c_LAO10.dcm": ((10.0, 0.0), "LAO"), "d.png": (None, None)}
