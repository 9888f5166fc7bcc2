"""check_manifest: every listed problem found at its row, on real files (no mocks)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.checks import CheckReport, ManifestCheckError, check_manifest
from pipeline.data.manifest import file_sha256, read_manifest, write_manifest


def _image(path: Path, seed: int, size: tuple[int, int] = (16, 20)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _mask(path: Path, size: tuple[int, int] = (16, 20), empty: bool = False, **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.zeros(size, dtype=np.uint8)
    if not empty:
        array[4:12, 3:15] = 255
    Image.fromarray(array).save(path, **save)
    return path


def _manifest(tmp_path: Path, rows: list[dict]) -> list:
    return read_manifest(write_manifest(tmp_path / "manifest.csv", rows))


@pytest.fixture
def broken(tmp_path) -> tuple[list, CheckReport]:
    """A manifest with one problem per row (row numbers in the comments)."""
    d = tmp_path
    truncated = _image(d / "truncated.png", 2)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    duplicate = d / "copy_of_good.png"
    shutil.copy(_image(d / "good.png", 1), duplicate)
    rows = [
        {"image": d / "good.png", "mask": _mask(d / "m_good.png"), "view": "AP", "split": "train"},
        {"image": truncated, "mask": _mask(d / "m2.png"), "view": "AP", "split": "train"},  # 2
        {"image": _image(d / "i3.png", 3), "mask": _mask(d / "m3.png", size=(16, 21)),  # 3
         "view": "AP", "split": "train"},
        {"image": duplicate, "mask": _mask(d / "m4.png"), "view": "AP", "split": "train"},  # 4
        {"image": _image(d / "i5.png", 5), "mask": _mask(d / "m5.jpg", quality=60),  # 5
         "view": "AP", "split": "val"},
        {"image": _image(d / "i6.png", 6), "mask": _mask(d / "m6.png", empty=True),  # 6
         "view": "AP", "split": "train"},
        {"image": _image(d / "i7.png", 7), "mask": _mask(d / "m7.png"),  # 7
         "view": "LAT", "split": "val"},
        {"image": _image(d / "i8.png", 8), "mask": d / "gone.png", "view": "AP",  # 8
         "split": "train"},
        {"image": _image(d / "i9.png", 9), "mask": None, "view": "AP", "split": "train"},  # 9
        {"image": d / "missing.png", "mask": _mask(d / "m10.png"), "view": "AP",  # 10
         "split": "train"},
    ]
    samples = _manifest(tmp_path, rows)
    return samples, check_manifest(samples, require_masks=True, threads=4)


def _rows(problems, text: str) -> list[int]:
    return [p.row for p in problems if text in p.message]


def test_errors_at_their_rows(broken):
    _, report = broken
    assert _rows(report.errors, "cannot be decoded") == [2]
    assert report.errors[0].path.name == "truncated.png"
    assert _rows(report.errors, "mask is 16x21") == [3]
    assert _rows(report.errors, "duplicate of row 1") == [4]
    assert "good.png" in next(str(p) for p in report.errors if p.row == 4)
    assert [(p.row, p.path.name) for p in report.errors if "file not found" in p.message] == [
        (8, "gone.png"), (10, "missing.png")]
    assert _rows(report.errors, "no mask given") == [9]
    assert not report.ok


def test_warnings_and_infos(broken):
    _, report = broken
    assert _rows(report.warnings, "mask is empty") == [6]
    assert _rows(report.warnings, "view 'LAT'") == [7]
    assert _rows(report.infos, "binarised") == [5]
    assert "thresholded at 127.5" in report.infos[0].message
    assert report.infos[0].path.name == "m5.jpg"


def test_keys_format_and_raise(broken):
    samples, report = broken
    assert len(report.keys) == len(samples)
    assert report.keys[0] == file_sha256(samples[0].image) == report.keys[3]
    assert report.keys[9] is None
    text = report.format()
    assert "10 rows, 6 errors, 2 warnings, 1 infos" in text
    assert "row 2: " in text and "truncated.png" in text
    assert "... and 4 more errors" in report.format(limit=2)
    with pytest.raises(ManifestCheckError, match="truncated.png") as caught:
        report.raise_if_errors()
    assert isinstance(caught.value, ValueError)


def test_clean_manifest_without_masks(tmp_path):
    rows = [{"image": _image(tmp_path / f"i{n}.png", n), "view": "AP",
             "split": "train" if n else "val"} for n in range(3)]
    samples = _manifest(tmp_path, rows)
    report = check_manifest(samples, require_masks=False)
    assert report.ok and not report.warnings and not report.infos
    report.raise_if_errors()
    assert check_manifest(samples, require_masks=True).errors[0].message.startswith("no mask")


def test_fields_of_view_are_checked(tmp_path):
    d = tmp_path
    truncated = _mask(d / "f_truncated.png")
    truncated.write_bytes(truncated.read_bytes()[:40])
    fovs = [_mask(d / "f_good.png"), d / "f_gone.png", truncated,
            _mask(d / "f_wide.png", size=(16, 24)), _mask(d / "f_empty.png", empty=True)]
    rows = [{"image": _image(d / f"i{i}.png", i), "mask": _mask(d / f"m{i}.png"), "fov": fov,
             "view": "AP", "split": "train"} for i, fov in enumerate(fovs, start=1)]
    samples = _manifest(tmp_path, rows)
    assert samples[0].fov == (d / "f_good.png").resolve()
    report = check_manifest(samples, require_masks=True)
    by_row = {problem.row: problem for problem in report.errors}
    assert sorted(by_row) == [2, 3, 4, 5]
    assert str(by_row[2]) == f"row 2: {d / 'f_gone.png'}: field of view file not found"
    assert by_row[3].path == truncated and "field of view cannot be" in by_row[3].message
    assert by_row[4].message == ("field of view is 16x24 (HxW) but its image i4.png is "
                                 "16x20 (HxW)")
    assert by_row[5].message == "field of view is empty (nothing to score)"


def test_dicom_sources_and_images_checked_once_per_file(tmp_path):
    """Rows from DICOM: a source gone, shortened (frame past the last), without pixel data,
    without angles (one warning per file), and DICOM images decoded by the row check."""
    from dicom_files import write_xa
    from pydicom.uid import MPEG4HP41

    run = np.zeros((3, 16, 20), np.uint8)
    short = write_xa(tmp_path / "short.dcm", run[:1])  # the run was replaced by 1 frame
    flat = write_xa(tmp_path / "flat.dcm", run, angles=None)
    nopix = write_xa(tmp_path / "nopix.dcm", run, pixels=False)
    video = write_xa(tmp_path / "video.dcm", run[0], syntax=MPEG4HP41,
                     encapsulated=[b"\0\0\1\xb3" + b"\0" * 8])
    single = write_xa(tmp_path / "single.dcm", run[0], angles=None)
    frames = [_image(tmp_path / "frames" / f"f{i}.png", i) for i in range(6)]
    mask = _mask(tmp_path / "mask.png")
    rows = [
        {"image": frames[0], "mask": mask, "source": short, "frame": 1},
        {"image": frames[1], "mask": mask, "source": short, "frame": 3},  # row 2: past the end
        {"image": frames[2], "mask": mask, "source": flat, "frame": 1},   # row 3: warn once
        {"image": frames[3], "mask": mask, "source": flat, "frame": 2},
        {"image": frames[4], "mask": mask, "source": nopix, "frame": 1},  # row 5
        {"image": frames[5], "mask": mask, "source": tmp_path / "gone.dcm", "frame": 1},  # 6
        {"image": video, "mask": mask},                                   # row 7
        {"image": single, "mask": _mask(tmp_path / "m2.png", size=(16, 21))},  # row 8
    ]
    report = check_manifest(_manifest(tmp_path, rows), require_masks=True)
    errors = [str(p) for p in report.errors]
    assert errors[0] == (f"row 2: {short}: frame 3 is past the last frame of {short} "
                         "(frames 1-1)")
    assert errors[1].startswith(f"row 5: {nopix}: no Pixel Data")
    assert errors[2] == f"row 6: {tmp_path / 'gone.dcm'}: DICOM source file not found"
    assert errors[3].startswith(f"row 7: {video}: transfer syntax MPEG-4")
    assert "has no pydicom decoder" in errors[3]
    assert errors[4].startswith(f"row 8: {tmp_path / 'm2.png'}: mask is 16x21")
    assert len(errors) == 5
    warnings = [str(p) for p in report.warnings if "C-arm angles" in str(p)]
    assert warnings == [
        f"row 3: {flat}: no C-arm angles (0018,1510/1511): its 2 row(s) have no angles and no "
        "view from them",
        f"row 8: {single}: no C-arm angles (0018,1510/1511): its 1 row(s) have no angles and no "
        "view from them"]


def test_a_mask_mostly_vessel_is_warned_about(tmp_path):
    inverted = np.full((16, 20), 255, np.uint8)
    inverted[4:6, :] = 0
    (tmp_path / "inv.png").parent.mkdir(exist_ok=True)
    Image.fromarray(inverted).save(tmp_path / "inv.png")
    opaque = np.stack([np.zeros((16, 20), np.uint8), np.full((16, 20), 255, np.uint8)], -1)
    Image.fromarray(opaque, "LA").save(tmp_path / "la.png")  # gray 0, alpha 255: no vessel
    samples = _manifest(tmp_path, [
        {"image": _image(tmp_path / "a.png", 1), "mask": tmp_path / "inv.png", "split": "train"},
        {"image": _image(tmp_path / "b.png", 2), "mask": tmp_path / "la.png", "split": "val"}])
    report = check_manifest(samples, require_masks=True)
    assert [str(w) for w in report.warnings] == [
        f"row 1: {tmp_path / 'inv.png'}: mask is 88% vessel: vessels cover far less of an image; "
        "is it inverted (vessels black on white)?",
        f"row 2: {tmp_path / 'la.png'}: mask is empty"]
