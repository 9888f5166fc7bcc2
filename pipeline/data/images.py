"""Reading images and masks of every accepted format, and SAM 3's own preprocessing.

Accepted: PNG, JPEG, TIFF (every compression tifffile + imagecodecs decode: LZW, Deflate,
PackBits, JPEG, zstd, ...; striped or tiled; planar contig or separate), GIF, BMP, and
single-frame DICOM (`.dcm`, or any file with the `DICM` preamble; see `pipeline.data.dicom`);
8- or 16-bit; grayscale, RGB or RGBA (alpha dropped), all turned into 3 channels.

Preprocessing is `Sam3Processor`'s transform, applied verbatim, in two halves: `sam3_resize`
(decode-side, in DataLoader workers, to uint8) and `normalize` (on the device the model runs on),
so loaders, collation, pinned buffers and host-to-device copies move 1 byte per pixel and channel
instead of 4. The halves compose to exactly `sam3_transform`.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2

from pipeline.data.dicom import is_dicom, read_dicom_image
from pipeline.data.formats import IMAGE_SUFFIXES, ImageError  # noqa: F401 - read from here too

NORM_MEAN = (0.5, 0.5, 0.5)
NORM_STD = (0.5, 0.5, 0.5)


def is_image_file(path: Path) -> bool:
    """Whether `path` is a file this module reads: an image suffix, or DICOM (`.dicom`)."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return path.is_file()
    return is_dicom(path)


def _read_array(path: Path) -> np.ndarray:
    """Decode `path` to (H, W) or (H, W, C) numpy, keeping its bit depth."""
    if not path.is_file():
        raise ImageError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        if is_dicom(path):
            return read_dicom_image(path)
        raise ImageError(f"{path}: unsupported format {suffix!r} (accepted: {IMAGE_SUFFIXES}, "
                         "and DICOM)")
    try:
        if suffix in (".tif", ".tiff"):
            array = _read_tiff(path)
        else:
            with Image.open(path) as image:
                image.load()
                if image.mode == "P":
                    image = image.convert("RGBA" if "transparency" in image.info else "RGB")
                elif image.mode in ("I;16", "I;16B", "I;16L"):
                    return np.asarray(image, dtype=np.uint16)
                elif image.mode == "I":
                    array = np.array(image)
                    if array.min() >= 0 and array.max() <= 65535:
                        return array.astype(np.uint16)
                elif image.mode not in ("L", "RGB", "RGBA", "1", "LA"):
                    image = image.convert("RGB")
                array = np.array(image)
    except ImageError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, KeyError, RuntimeError) as err:
        raise ImageError(f"{path}: cannot be decoded ({err}){_package_hint(err)}") from err
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (2, 3, 4)):
        raise ImageError(f"{path}: unsupported shape {array.shape} (expected H x W [x C])")
    return array


def _read_tiff(path: Path) -> np.ndarray:
    """The first image of a TIFF as (H, W) or (H, W, C), planar (C, H, W) data moved last."""
    import tifffile

    with tifffile.TiffFile(path) as tiff:
        series = tiff.series[0]
        array, axes = series.asarray(), series.axes
    if array.ndim == 3 and axes.startswith("S"):  # planar configuration "separate"
        array = np.moveaxis(array, 0, -1)
    elif array.ndim == 3 and not axes.endswith("S"):
        raise ImageError(f"{path}: holds {array.shape[0]} pages or frames (axes {axes}); "
                         "give one image per file")
    return array


def _package_hint(err: Exception) -> str:
    """A hint naming the package a decoder asked for (tifffile: "requires the 'imagecodecs'
    package"), else ""."""
    match = re.search(r"requires the '([\w.-]+)' package", str(err))
    return f"; pip install {match.group(1)}" if match else ""


def read_image(path: str | Path) -> torch.Tensor:
    """Decode an image to (3, H, W) uint8 or uint16, as stored; alpha dropped, gray repeated."""
    path = Path(path)
    array = _read_array(path)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.dtype not in (np.uint8, np.uint16):
        raise ImageError(f"{path}: pixel type {array.dtype} is not supported (8- or 16-bit only)")
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    elif array.shape[-1] == 2:  # gray + alpha
        array = np.repeat(array[..., :1], 3, axis=-1)
    else:
        array = array[..., :3]
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)


def read_mask(path: str | Path) -> tuple[np.ndarray, str]:
    """Decode a mask to (H, W) bool, and say how it was binarised.

    Every mode gives one value per pixel first: gray (L, I;16, I, 1) as stored; color (RGB, and
    P through its palette) the brightest channel; with alpha (LA, RGBA, P with transparency) the
    same, and a fully transparent pixel (alpha 0) is background: alpha says where something was
    drawn, never that a pixel is vessel (an opaque gray + alpha mask is its gray values).
    Then masks of 0/1 keep every non-zero pixel; anything else (0/255, 0/65535, anti-aliased or
    JPEG edges) keeps pixels above half of the mask's maximum.
    """
    path = Path(path)
    array = _read_array(path)
    if array.ndim == 3:
        channels = array.shape[-1]
        value = array[..., : 1 if channels == 2 else 3].max(axis=-1)
        if channels in (2, 4):  # gray + alpha, RGBA
            value = np.where(array[..., -1] > 0, value, np.zeros_like(value))
        array = value
    values = np.unique(array)
    if values.size <= 2 and values.max(initial=0) <= 1:
        return array > 0, "binary 0/1"
    top = float(values.max())
    rule = f"values {values.tolist()}" if values.size <= 2 else f"{values.size} distinct values"
    return array > top / 2, f"{rule}, thresholded at {top / 2:g}"


def sam3_transform(resolution: int) -> v2.Compose:
    """`Sam3Processor`'s transform: (3, H, W) uint8/uint16 -> (3, R, R) float32 in [-1, 1]."""
    return v2.Compose([
        v2.ToDtype(torch.uint8, scale=True),
        v2.Resize(size=(resolution, resolution)),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(NORM_MEAN), std=list(NORM_STD)),
    ])


def sam3_resize(resolution: int) -> v2.Compose:
    """The first half of `sam3_transform`: (3, H, W) uint8/uint16 -> (3, R, R) uint8."""
    return v2.Compose(sam3_transform(resolution).transforms[:2])


def normalize(image: torch.Tensor) -> torch.Tensor:
    """The second half of `sam3_transform`, on `image`'s device: (..., 3, R, R) uint8 ->
    float32 in [-1, 1], bit-identical to `sam3_transform`."""
    if image.dtype != torch.uint8:
        raise TypeError(f"normalize takes the uint8 output of sam3_resize, got {image.dtype}")
    scaled = v2.functional.to_dtype(image, torch.float32, scale=True)
    return v2.functional.normalize(scaled, mean=list(NORM_MEAN), std=list(NORM_STD))


def load_preprocessed(path: str | Path, resolution: int) -> torch.Tensor:
    """Read and preprocess one image: (3, R, R) float32, normalised to [-1, 1]."""
    return sam3_transform(resolution)(read_image(path))


def preprocessing_signature() -> dict:
    """What the preprocessing depends on besides the resolution (part of a cache's signature)."""
    return {
        "resize": "torchvision.v2.Resize bilinear antialias on uint8",
        "scale": "[0, 1]",
        "mean": list(NORM_MEAN),
        "std": list(NORM_STD),
        # DICOM pixels become 8-bit display values first (pipeline.data.dicom.display_frame)
        "dicom": "stored bits, modality LUT, first VOI, its range to 0-255, MONOCHROME1 inverted",
    }
