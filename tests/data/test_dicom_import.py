"""`import dicom`: XA runs written by pydicom -> PNG frames, angles, views, grouped splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dicom_files import write_xa
from PIL import Image

from pipeline.data.dicom import read_frames
from pipeline.data.dicom_import import import_dicom
from pipeline.data.importers import DatasetImportError
from pipeline.data.manifest import read_manifest

RNG = np.random.default_rng(11)
H, W = 12, 10


def _mask(path: Path, size=(H, W)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros(size, np.uint8)
    mask[2:6, 3:5] = 255
    Image.fromarray(mask).save(path)
    return path


@pytest.fixture
def cathlab(tmp_path) -> dict:
    """Two patients' runs in folders that do not name them, plus a study without Patient ID."""
    runs = {
        "runA": dict(stored=RNG.integers(0, 4096, (3, H, W)).astype(np.uint16), bits_stored=12,
                     angles=(44.6, 29.0), patient="P001", folder="room1"),
        "IM0002": dict(stored=RNG.integers(0, 256, (H, W)).astype(np.uint8),
                       photometric="MONOCHROME1", angles=(-31.0, -18.0), patient="P001",
                       folder="room1"),
        "runC": dict(stored=RNG.integers(0, 256, (4, H, W)).astype(np.uint8), angles=None,
                     patient="P002", folder="room2"),
        "runD": dict(stored=RNG.integers(0, 256, (2, H, W)).astype(np.uint8), angles=(0, 25),
                     patient=None, study="1.2.826.0.1.99", folder="room2"),
    }
    root = tmp_path / "dicom"
    for name, spec in runs.items():
        spec = dict(spec)
        folder = spec.pop("folder")
        suffix = "" if name.startswith("IM") else ".dcm"
        spec["path"] = write_xa(root / folder / f"{name}{suffix}", spec.pop("stored"), **spec)
    masks = tmp_path / "masks"
    for name in ("runA_1", "runA_3", "IM0002_1", "runC_2", "runC_04", "runD_1"):
        _mask(masks / f"{name}.png")
    return {"root": root, "masks": masks, "frames": tmp_path / "frames",
            "out": tmp_path / "angio.csv"}


def _import(cathlab, **kw):
    return import_dicom(cathlab["root"], cathlab["out"], frames_dir=cathlab["frames"],
                        masks_dir=kw.pop("masks", cathlab["masks"]), **kw)


def test_rows_angles_views_splits_and_frames(cathlab):
    result = _import(cathlab, split_ratio=0.5)
    samples = read_manifest(result.manifest)
    names = [s.image.relative_to(cathlab["frames"]).as_posix() for s in samples]
    assert names == ["room1/IM0002_1.png", "room1/runA_1.png", "room1/runA_3.png",
                     "room2/runC_2.png", "room2/runC_4.png", "room2/runD_1.png"]
    assert [s.mask.name for s in samples] == [
        "IM0002_1.png", "runA_1.png", "runA_3.png", "runC_2.png", "runC_04.png", "runD_1.png"]
    assert [s.frame for s in samples] == [1, 1, 3, 2, 4, 1]
    assert [s.source.name for s in samples] == [
        "IM0002", "runA.dcm", "runA.dcm", "runC.dcm", "runC.dcm", "runD.dcm"]
    assert [s.angles for s in samples] == [(-31.0, -18.0), (44.6, 29.0), (44.6, 29.0), None,
                                           None, (0.0, 25.0)]
    assert [s.view for s in samples] == ["RAO30_CAU20", "LAO45_CRA30", "LAO45_CRA30", None,
                                         None, "AP_CRA30"]
    # Three groups (P001, P002, runD's study): each whole on one side, both sides used.
    split_of = {}
    for sample, group in zip(samples, ["P001", "P001", "P001", "P002", "P002", "study"],
                             strict=True):
        assert split_of.setdefault(group, sample.split) == sample.split
    assert set(split_of.values()) == {"train", "val"}
    assert [n for n in result.notes if "runC.dcm" in n and "no Positioner" in n]
    assert len(result.notes) == 1
    for sample in samples:  # the PNG is the frame as `read_frames` displays it
        with Image.open(sample.image) as png:
            assert png.mode == "L"
            assert np.array_equal(np.asarray(png), read_frames(sample.source)[sample.frame - 1])


def test_frame_pixels_follow_the_stored_bits_and_photometry(cathlab):
    samples = read_manifest(_import(cathlab).manifest)
    import pydicom

    by_name = {s.image.name: s for s in samples}
    stored = pydicom.dcmread(by_name["runA_3.png"].source).pixel_array[2]
    expected = np.rint(stored * (255 / 4095)).astype(np.uint8)  # 12 bits stored
    assert np.array_equal(np.asarray(Image.open(by_name["runA_3.png"].image)), expected)
    stored = pydicom.dcmread(by_name["IM0002_1.png"].source).pixel_array
    assert np.array_equal(np.asarray(Image.open(by_name["IM0002_1.png"].image)), 255 - stored)


def test_no_patient_identifier_is_written(cathlab):
    _import(cathlab, all_frames=True)
    written = cathlab["out"].read_text() + " ".join(
        p.name for p in cathlab["frames"].rglob("*"))
    for identifier in ("P001", "P002", "Doe", "Jane", "19500101", "20240102", "1.2.826.0.1.99"):
        assert identifier not in written


def test_all_frames_and_frames_written_once(cathlab):
    samples = read_manifest(_import(cathlab, all_frames=True).manifest)
    assert len(samples) == 3 + 1 + 4 + 2
    masked = {s.image.name for s in samples if s.mask is not None}
    assert masked == {"runA_1.png", "runA_3.png", "IM0002_1.png", "runC_2.png", "runC_4.png",
                      "runD_1.png"}
    stamps = {p: p.stat().st_mtime_ns for p in cathlab["frames"].rglob("*.png")}
    assert len(stamps) == 10
    again = read_manifest(_import(cathlab, all_frames=True).manifest)
    assert again == samples
    assert {p: p.stat().st_mtime_ns for p in cathlab["frames"].rglob("*.png")} == stamps
    without_masks = read_manifest(_import(cathlab, all_frames=True, masks=None).manifest)
    assert len(without_masks) == 10 and all(s.mask is None for s in without_masks)


def test_every_problem_is_listed_before_anything_is_written(cathlab):
    root, masks = cathlab["root"], cathlab["masks"]
    write_xa(root / "room3" / "nopix.dcm", np.zeros((2, H, W), np.uint8), pixels=False)
    _mask(masks / "runA_5.png")  # runA has 3 frames
    _mask(masks / "runC_1.png", size=(H + 1, W))
    _mask(masks / "ghost_1.png")
    _mask(masks / "notes.png")
    with pytest.raises(DatasetImportError) as info:
        _import(cathlab)
    text = str(info.value)
    assert "DICOM problems (nothing was written) (5)" in text
    assert f"{root / 'room3' / 'nopix.dcm'}: no Pixel Data" in text
    assert f"{masks / 'runA_5.png'}: frame 5 is past the last frame of " in text
    assert "(frames 1-3)" in text
    assert f"{masks / 'runC_1.png'}: mask is 13x10 (HxW) but the frames of " in text
    assert f"{masks / 'ghost_1.png'}: no DICOM file with key 'ghost'" in text
    assert f"{masks / 'notes.png'}: name does not match" in text
    assert not cathlab["out"].exists() and not cathlab["frames"].exists()


def test_masks_or_all_frames_are_required_and_a_run_without_masks_is_named(cathlab):
    with pytest.raises(DatasetImportError, match="--masks.*--all-frames"):
        _import(cathlab, masks=None)
    (cathlab["masks"] / "runD_1.png").unlink()
    result = _import(cathlab)
    assert any("runD.dcm: no mask for any of its 2 frame(s); not imported" in n
               for n in result.notes)
    assert len(read_manifest(result.manifest)) == 5


def test_mask_regex_with_key_and_frame_groups(cathlab, tmp_path):
    other = tmp_path / "labels"
    _mask(other / "frame-0003-of-runA-vessels.png")
    samples = read_manifest(_import(cathlab, masks=other, mask_regex=(
        r"frame-(?P<frame>\d+)-of-(?P<key>\w+)-vessels")).manifest)
    assert [(s.source.name, s.frame, s.mask.name) for s in samples] == [
        ("runA.dcm", 3, "frame-0003-of-runA-vessels.png")]
    with pytest.raises(DatasetImportError, match=r"needs the groups \(\?P<key>"):
        _import(cathlab, masks=other, mask_regex=r"(\w+)")


def test_files_sharing_a_stem_import_without_masks(tmp_path):
    root = tmp_path / "dicom"
    for room in ("room1", "room2"):
        write_xa(root / room / "run1.dcm", RNG.integers(0, 256, (2, H, W)).astype(np.uint8),
                 patient=room)
    result = import_dicom(root, tmp_path / "all.csv", frames_dir=tmp_path / "frames",
                          all_frames=True)
    samples = read_manifest(result.manifest)
    assert sorted(str(s.image.relative_to(tmp_path / "frames")) for s in samples) == [
        "room1/run1_1.png", "room1/run1_2.png", "room2/run1_1.png", "room2/run1_2.png"]
    with pytest.raises(DatasetImportError, match="DICOM files share a mask key"):
        import_dicom(root, tmp_path / "m.csv", frames_dir=tmp_path / "frames",
                     masks_dir=_mask(tmp_path / "masks" / "run1_1.png").parent)


def test_repeated_pixels_are_imported_once_and_named(tmp_path):
    import shutil

    from pipeline.data.checks import check_manifest

    root = tmp_path / "dicom"
    run = RNG.integers(0, 256, (3, H, W)).astype(np.uint8)
    write_xa(root / "a.dcm", run, patient="P1")
    shutil.copy(root / "a.dcm", root / "b.dcm")  # the same file twice
    still = RNG.integers(0, 256, (H, W)).astype(np.uint8)
    write_xa(root / "c.dcm", np.stack([still, still, run[0] // 2]), patient="P2")
    for name, patient in (("d.dcm", "P3"), ("e.dcm", "P4")):  # blank frames, two patients
        write_xa(root / name, np.zeros((2, H, W), np.uint8), patient=patient)
    result = import_dicom(root, tmp_path / "m.csv", frames_dir=tmp_path / "frames",
                          all_frames=True, split_ratio=0.5)
    samples = read_manifest(result.manifest)
    assert [(s.source.name, s.frame) for s in samples] == [
        ("a.dcm", 1), ("a.dcm", 2), ("a.dcm", 3), ("c.dcm", 1), ("c.dcm", 3), ("d.dcm", 1)]
    assert result.notes == [
        f"{root / 'b.dcm'}: 3 frame(s) not imported, the same pixels as frames of "
        f"{root / 'a.dcm'} (one image twice would leak between splits): frame 1 (= frame 1), "
        "2 (= frame 2), 3 (= frame 3)",
        f"{root / 'c.dcm'}: 1 frame(s) not imported, the same pixels as frames of "
        f"{root / 'c.dcm'} (one image twice would leak between splits): frame 2 (= frame 1)",
        f"{root / 'd.dcm'}: 1 frame(s) not imported, the same pixels as frames of "
        f"{root / 'd.dcm'} (one image twice would leak between splits): frame 2 (= frame 1)",
        f"{root / 'e.dcm'}: 2 frame(s) not imported, the same pixels as frames of "
        f"{root / 'd.dcm'} (one image twice would leak between splits): frame 1 (= frame 1), "
        "2 (= frame 1)"]
    assert check_manifest(samples, require_masks=False).ok  # what check refused before
    assert sorted(p.name for p in (tmp_path / "frames").rglob("*.png")) == [
        "a_1.png", "a_2.png", "a_3.png", "c_1.png", "c_3.png", "d_1.png"]
