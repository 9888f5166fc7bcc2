"""DICOM reading: detection, the grayscale pipeline, compressed syntaxes, problems named."""

from __future__ import annotations

import subprocess
import sys

import imagecodecs
import numpy as np
import pytest
from conftest import subprocess_env
from dicom_files import write_xa
from pydicom.uid import (
    MPEG4HP41,
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from pipeline.data.dicom import DicomError, is_dicom, read_frames, read_info, view_label
from pipeline.data.images import ImageError, read_image

RNG = np.random.default_rng(3)


def _stored(bits: int, shape=(3, 9, 7)) -> np.ndarray:
    return RNG.integers(0, 2**bits, shape).astype(np.uint8 if bits <= 8 else np.uint16)


def test_dicom_is_found_by_suffix_or_preamble(tmp_path):
    write_xa(tmp_path / "run.dcm", _stored(8))
    write_xa(tmp_path / "IM0001", _stored(8))
    (tmp_path / "fake.bin").write_bytes(b"\0" * 128 + b"DICX" + b"\0" * 10)
    (tmp_path / "short").write_bytes(b"DICM")
    assert is_dicom(tmp_path / "run.dcm") and is_dicom(tmp_path / "IM0001")
    assert not is_dicom(tmp_path / "fake.bin") and not is_dicom(tmp_path / "short")
    assert not is_dicom(tmp_path / "absent.dcm")


@pytest.mark.parametrize("bits", [8, 10, 12, 16])
def test_stored_bits_scale_to_8_bits_like_16_bit_images(tmp_path, bits):
    stored = _stored(bits)
    stored.flat[:2] = 0, 2**bits - 1  # the whole stored range maps onto 0..255
    noisy = stored | np.uint16(0xF000) if 8 < bits < 16 else stored  # bits above High Bit
    frames = read_frames(write_xa(tmp_path / "x.dcm", noisy, bits_stored=bits))
    expected = np.rint(stored.astype(np.float64) * 255 / (2**bits - 1)).astype(np.uint8)
    assert frames.dtype == np.uint8 and np.array_equal(frames, expected)


def test_monochrome1_is_inverted(tmp_path):
    stored = _stored(12, (9, 7))
    mono2 = read_image(write_xa(tmp_path / "m2.dcm", stored, bits_stored=12))
    mono1 = read_image(write_xa(tmp_path / "m1.dcm", stored, bits_stored=12,
                                photometric="MONOCHROME1"))
    assert (mono1.int() + mono2.int() == 255).all()


def test_modality_rescale_then_window_of_the_header(tmp_path):
    """The window is in the rescaled (modality) units, and its output range is the rescaled
    stored range, as DICOM PS3.3 C.11.2.1.2 and `pydicom.pixels.apply_windowing` define."""
    stored = _stored(12, (9, 7))
    slope, intercept, center, width = 2.0, -100.0, 3000.0, 2001.0
    path = write_xa(tmp_path / "w.dcm", stored, bits_stored=12, window=(center, width),
                    rescale=(slope, intercept))
    x = stored * slope + intercept
    low, high = intercept, 4095 * slope + intercept
    linear = ((x - (center - 0.5)) / (width - 1) + 0.5) * (high - low) + low  # PS3.3 formula
    windowed = np.where(x <= center - 0.5 - (width - 1) / 2, low,
                        np.where(x > center - 0.5 + (width - 1) / 2, high, linear))
    expected = np.rint((windowed - low) * 255 / (high - low)).astype(np.uint8)
    assert np.array_equal(read_frames(path)[0], expected)
    assert (expected == 0).any() and (expected == 255).any()  # the window clipped both ends
    # A rescale without a window is linear over the whole range: the same as no rescale.
    plain = read_frames(write_xa(tmp_path / "r.dcm", stored, bits_stored=12,
                                 rescale=(slope, intercept)))
    assert np.array_equal(plain, read_frames(write_xa(tmp_path / "n.dcm", stored,
                                                      bits_stored=12)))


def test_header_facts_without_decoding(tmp_path):
    path = write_xa(tmp_path / "run.dcm", _stored(12), bits_stored=12, angles=(-31.5, 18.0),
                    patient="P7")
    info = read_info(path)
    assert (info.frames, info.size, info.angles, info.group) == (3, (9, 7), (-31.5, 18.0), "P7")
    assert info.problem is None
    bare = read_info(write_xa(tmp_path / "b.dcm", _stored(8), angles=None, patient=None,
                              study="1.2.3.4"))
    assert bare.angles is None and bare.group == "1.2.3.4"


def _encoded(syntax, frames: np.ndarray) -> list[bytes]:
    """Each (H, W) 12-bit frame compressed for `syntax` by an encoder other than the decoder."""
    if syntax == JPEGLosslessSV1:  # the usual XA syntax: libjpeg-turbo encodes
        return [imagecodecs.jpeg8_encode(f, lossless=True, predictor=1, bitspersample=12)
                for f in frames]
    if syntax == JPEGLSLossless:  # CharLS encodes
        return [imagecodecs.jpegls_encode(f, level=0) for f in frames]
    raise ValueError(syntax)


@pytest.mark.parametrize("syntax", [JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless,
                                    RLELossless, DeflatedExplicitVRLittleEndian])
def test_compressed_syntaxes_decode_exactly(tmp_path, syntax):
    stored = _stored(12, (2, 64, 48))
    expected = np.rint(stored * (255 / 4095)).astype(np.uint8)
    if syntax in (JPEGLosslessSV1, JPEGLSLossless):
        path = write_xa(tmp_path / "x.dcm", stored, bits_stored=12, syntax=syntax,
                        encapsulated=_encoded(syntax, stored))
    else:  # compressed by pydicom itself (openjpeg, its RLE encoder, zlib)
        import pydicom

        ds = pydicom.dcmread(write_xa(tmp_path / "raw.dcm", stored, bits_stored=12))
        if syntax == DeflatedExplicitVRLittleEndian:
            ds.file_meta.TransferSyntaxUID = syntax
        else:
            ds.compress(syntax)
        path = tmp_path / "x.dcm"
        ds.save_as(path, enforce_file_format=True)
    assert pydicom_syntax(path) == syntax
    assert np.array_equal(read_frames(path), expected)


def test_jpeg_baseline_decodes_close_to_its_source(tmp_path):
    rows, cols = np.meshgrid(np.arange(64), np.arange(48), indexing="ij")
    smooth = (40 + 2 * rows + cols).astype(np.uint8)  # lossy JPEG: a smooth frame, a tolerance
    path = write_xa(tmp_path / "b.dcm", smooth, syntax=JPEGBaseline8Bit,
                    encapsulated=[imagecodecs.jpeg8_encode(smooth, level=95)])
    assert pydicom_syntax(path) == JPEGBaseline8Bit
    assert np.abs(read_frames(path)[0].astype(float) - smooth).mean() < 1.0


def pydicom_syntax(path):
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID


def test_multi_frame_given_as_an_image_points_to_import_dicom(tmp_path):
    path = write_xa(tmp_path / "cine.dcm", _stored(8))
    with pytest.raises(ImageError, match=r"cine\.dcm: multi-frame DICOM \(3 frames\).*"
                                         r"import dicom"):
        read_image(path)


def test_problems_name_the_file_and_the_fix(tmp_path):
    empty = write_xa(tmp_path / "empty.dcm", _stored(8), pixels=False)
    assert "no Pixel Data" in read_info(empty).problem
    with pytest.raises(DicomError, match=r"empty\.dcm: no Pixel Data"):
        read_frames(empty)
    video = write_xa(tmp_path / "video.dcm", _stored(8, (9, 7)), syntax=MPEG4HP41,
                     encapsulated=[b"\0\0\1\xb3" + b"\0" * 8])
    with pytest.raises(ImageError, match=r"video\.dcm: transfer syntax MPEG-4.* has no pydicom "
                                         r"decoder: convert"):
        read_image(video)
    with pytest.raises(DicomError, match=r"junk\.dcm: not a readable DICOM file"):
        (tmp_path / "junk.dcm").write_bytes(b"\1\2\3")
        read_info(tmp_path / "junk.dcm")


def test_a_missing_jpeg_handler_is_named(tmp_path):
    stored = _stored(12, (16, 12))
    path = write_xa(tmp_path / "jl.dcm", stored, bits_stored=12, syntax=JPEGLosslessSV1,
                    encapsulated=[imagecodecs.jpeg8_encode(stored, lossless=True, predictor=1,
                                                           bitspersample=12)])
    # A real interpreter where pylibjpeg cannot be imported (an install without it).
    code = ("import sys\nfor m in ('pylibjpeg', 'libjpeg', 'openjpeg'): sys.modules[m] = None\n"
            "from pipeline.data.images import read_image\n"
            f"read_image({str(path)!r})")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=subprocess_env(), timeout=120)
    assert result.returncode == 1
    assert f"{path}: transfer syntax JPEG Lossless" in result.stderr
    assert "pip install one of" in result.stderr and "pylibjpeg-libjpeg" in result.stderr


@pytest.mark.parametrize("angles,label", [
    ((44.6, 29.0), "LAO45_CRA30"), ((-31.0, -18.0), "RAO30_CAU20"), ((2.0, 4.9), "AP"),
    ((-7.5, 0.0), "RAO15"), ((7.4, 0.0), "AP"), ((90.0, -40.0), "LAO90_CAU40"),
    ((0.0, 25.0), "AP_CRA30"), ((-0.2, -5.0), "AP_CAU10"),
])
def test_view_label_is_the_nearest_standard_projection(angles, label):
    assert view_label(*angles) == label


def test_a_voi_lut_sequence_wins_over_the_window(tmp_path):
    """The VOI LUT Sequence (here an inverting 8-bit LUT over the 12-bit range) is applied in
    preference to the window, and its own 0..255 range is the output range."""
    import pydicom
    from pydicom.dataset import Dataset

    stored = _stored(12, (9, 7))
    path = write_xa(tmp_path / "lut.dcm", stored, bits_stored=12, window=(100.0, 10.0))
    ds = pydicom.dcmread(path)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 8]
    item.LUTData = [255 - v // 16 for v in range(4096)]
    item["LUTData"].VR = "US"
    ds.VOILUTSequence = [item]
    ds.save_as(path, enforce_file_format=True)
    assert np.array_equal(read_frames(path)[0], (255 - stored // 16).astype(np.uint8))


def _with_primary_angle(path, text: str, frames: int = 2):
    """An XA file whose Positioner Primary Angle holds `text` as stored (DS, unchecked)."""
    import pydicom

    ds = pydicom.dcmread(write_xa(path, _stored(8, (frames, 9, 7))))
    ds["PositionerPrimaryAngle"]._value = text
    ds.save_as(path)
    return path


@pytest.mark.parametrize("text,shown", [
    ("nan", "primary angle nan is not a finite number of degrees (DICOM's range)"),
    ("Infinity", "primary angle inf is not a finite number of degrees (DICOM's range)"),
    ("200", "primary angle 200 is outside -180..180 degrees (DICOM's range)"),
])
def test_an_angle_out_of_range_names_the_file_and_tag(tmp_path, text, shown):
    path = _with_primary_angle(tmp_path / "run.dcm", text)
    with pytest.raises(DicomError) as raised:
        read_info(path)
    assert str(raised.value) == (f"{path}: Positioner Primary Angle (0018,1510): {shown}; "
                                 "correct the header (e.g. dcmodify) or remove the tag")


@pytest.mark.parametrize("text", ["LAO30", "30\\40"])
def test_an_angle_that_is_not_one_number_names_the_file_and_tag(tmp_path, text):
    path = _with_primary_angle(tmp_path / "run.dcm", text)
    with pytest.raises(DicomError) as raised:
        read_info(path)
    assert str(raised.value) == (
        f"{path}: Positioner Primary Angle (0018,1510) is '{text}', not one number of degrees; "
        "correct the header (e.g. dcmodify) or remove the tag")


def test_secondary_angle_range_and_180_is_one_projection(tmp_path):
    path = write_xa(tmp_path / "cau.dcm", _stored(8, (9, 7)), angles=(-179.0, 95.0))
    with pytest.raises(DicomError, match=r"Positioner Secondary Angle \(0018,1511\): secondary "
                       r"angle 95 is outside -90..90 degrees"):
        read_info(path)
    for primary in (180.0, -180.0):
        info = read_info(write_xa(tmp_path / f"{primary}.dcm", _stored(8, (9, 7)),
                                  angles=(primary, 0.0)))
        assert info.angles == (180.0, 0.0)
        assert view_label(*info.angles) == "PA"
    assert view_label(-175.0, 0.0) == view_label(175.0, 0.0) == "PA"


def test_import_names_a_bad_angle_and_writes_nothing(tmp_path):
    from pipeline.data.cli import main

    dicom = tmp_path / "dicom"
    _with_primary_angle(dicom / "run.dcm", "nan")
    frames = tmp_path / "frames"
    code = main(["import", "dicom", str(dicom), "--out", str(tmp_path / "m.csv"),
                 "--frames-out", str(frames), "--all-frames"])
    assert code == 1 and not frames.exists() and not (tmp_path / "m.csv").exists()
    single = tmp_path / "single"
    _with_primary_angle(single / "image.dcm", "LAO30", frames=1)
    from pipeline.data.importers import import_folder

    with pytest.raises(DicomError, match=r"image.dcm: Positioner Primary Angle \(0018,1510\) "
                       r"is 'LAO30'"):
        import_folder(single, tmp_path / "f.csv", allow_missing_masks=True, split_ratio=None)
