import subprocess
import sys

import numpy as np
import pytest
import tifffile
import torch
from conftest import subprocess_env
from dicom_files import write_xa
from PIL import Image

from pipeline.data.images import (
    ImageError,
    is_image_file,
    load_preprocessed,
    normalize,
    read_image,
    sam3_resize,
    sam3_transform,
)
from pipeline.data.manifest import read_manifest
from pipeline.data.samples import SegmentationSamples, ViewVocabulary


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


def _smooth(shape, dtype) -> np.ndarray:
    """A smooth test picture (JPEG-friendly) of `shape`, spanning most of `dtype`'s range."""
    top = np.iinfo(dtype).max
    rows, cols = np.meshgrid(np.linspace(0, 1, shape[0]), np.linspace(0, 1, shape[1]),
                             indexing="ij")
    planes = [(0.1 + 0.8 * (rows + k * cols) / (1 + k)) * top for k in range(3)]
    picture = np.stack(planes, axis=-1) if len(shape) == 3 else planes[0]
    return np.rint(picture).astype(dtype)


TIFF_COMPRESSIONS = ["lzw", "deflate", "adobe_deflate", "packbits", "zstd", "jpeg", None]
TIFF_LAYOUTS = [  # (channels, planar configuration)
    (1, None), (3, "contig"), (3, "separate")]


# JPEG in TIFF is 8-bit only (libjpeg-turbo refuses 16-bit lossy data).
@pytest.mark.parametrize("compression,dtype", [
    (c, d) for c in TIFF_COMPRESSIONS for d in (np.uint8, np.uint16)
    if not (c == "jpeg" and d == np.uint16)])
@pytest.mark.parametrize("channels,planar", TIFF_LAYOUTS)
@pytest.mark.parametrize("tile", [None, (16, 16)], ids=["striped", "tiled"])
def test_every_common_tiff_variant_decodes_to_its_pixels(tmp_path, compression, dtype, channels,
                                                         planar, tile):
    source = _smooth((37, 45) if channels == 1 else (37, 45, 3), dtype)
    stored = np.moveaxis(source, -1, 0) if planar == "separate" else source
    path = tmp_path / "x.tif"
    tifffile.imwrite(path, stored, compression=compression, tile=tile, planarconfig=planar,
                     photometric="minisblack" if channels == 1 else "rgb")
    with tifffile.TiffFile(path) as tiff:  # the file really is what the test says
        page = tiff.pages[0]
        assert page.is_tiled == (tile is not None)
        assert page.compression.name.lower().replace("_", "") == (
            (compression or "none").replace("_", "") if compression != "jpeg" else "jpeg")
    image = read_image(path)
    expected = np.repeat(source[..., None], 3, -1) if channels == 1 else source
    decoded = image.permute(1, 2, 0).numpy()
    assert image.dtype == torch.from_numpy(source).dtype and decoded.shape == expected.shape
    if compression == "jpeg":  # lossy: close, not equal
        assert np.abs(decoded.astype(float) - expected).mean() < 1.5
    else:
        assert np.array_equal(decoded, expected)


def test_a_tiff_codec_missing_names_the_package(tmp_path):
    path = tmp_path / "21_training.tif"
    tifffile.imwrite(path, _smooth((20, 24, 3), np.uint8), compression="lzw", photometric="rgb")
    # A real interpreter in which imagecodecs cannot be imported (as on an install without it).
    code = ("import sys; sys.modules['imagecodecs'] = None\n"
            "from pipeline.data.images import read_image\n"
            f"read_image({str(path)!r})")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=subprocess_env(), timeout=120)
    assert result.returncode == 1
    assert f"ImageError: {path}: cannot be decoded" in result.stderr
    assert "LZW" in result.stderr and "pip install imagecodecs" in result.stderr


def test_a_tiff_stack_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.zeros((5, 20, 24), np.uint8))
    with pytest.raises(ImageError, match=r"stack\.tif: holds 5 pages or frames"):
        read_image(path)


def test_dicom_images_are_read_wherever_images_are(tmp_path):
    stored = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10) * 2
    for path in (tmp_path / "a.dcm", tmp_path / "IM000001", tmp_path / "1.2.840.113619"):
        write_xa(path, stored)
        assert is_image_file(path)
        image = read_image(path)
        assert image.dtype == torch.uint8 and image.shape == (3, 12, 10)
        assert torch.equal(image[1], torch.from_numpy(stored))
    (tmp_path / "notes.txt").write_text("not an image")
    assert not is_image_file(tmp_path / "notes.txt")
    with pytest.raises(ImageError, match=r"notes\.txt: unsupported format '\.txt'"):
        read_image(tmp_path / "notes.txt")


def _line(size=(12, 16)) -> np.ndarray:
    mask = np.zeros(size, bool)
    mask[:, 5] = mask[7, :] = True
    return mask


def _in_mode(mask: np.ndarray, mode: str) -> Image.Image:
    """`mask` saved as a PNG of `mode`, vessels white (or palette index 1, or alpha-opaque)."""
    gray = mask.astype(np.uint8) * 255
    if mode == "L":
        return Image.fromarray(gray)
    if mode == "1":
        return Image.fromarray(gray).convert("1")
    if mode == "I;16":
        return Image.fromarray(mask.astype(np.uint16) * 65535)
    if mode == "LA":  # opaque everywhere: alpha 255 must not make every pixel vessel
        return Image.fromarray(np.stack([gray, np.full_like(gray, 255)], -1), "LA")
    if mode == "RGB":  # a red annotation
        return Image.fromarray(np.stack([gray, gray * 0, gray * 0], -1))
    if mode == "RGBA":  # strokes on a transparent white layer: white, but alpha 0
        rgb = np.where(mask[..., None], [255, 0, 0], [255, 255, 255]).astype(np.uint8)
        return Image.fromarray(np.dstack([rgb, gray]), "RGBA")
    image = Image.fromarray(mask.astype(np.uint8), "P")  # palette: 0 black, 1 green
    image.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    return image


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGB", "RGBA", "I;16", "1"])
def test_every_mask_mode_reads_its_vessels(tmp_path, mode):
    from pipeline.data.images import read_mask

    image = _in_mode(_line(), mode)
    assert image.mode == mode
    image.save(tmp_path / "mask.png")
    mask, _ = read_mask(tmp_path / "mask.png")
    np.testing.assert_array_equal(mask, _line())
