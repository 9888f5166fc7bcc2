"""DICOM images (X-ray angiography above all), read with pydicom: pixels, C-arm angles, problems.

A file is DICOM when its suffix is `.dcm` / `.dicom` or it carries the `DICM` preamble at byte
128 (PACS exports often have no suffix, or a numeric one). Pixel data goes through pydicom's own
decoders: uncompressed, Deflate and RLE natively, JPEG baseline/extended and JPEG 2000 through
Pillow, JPEG Lossless, JPEG-LS, JPEG 2000 and HTJ2K through pylibjpeg (pylibjpeg-libjpeg,
pylibjpeg-openjpeg). A syntax no installed handler decodes is reported with what to install.

Display pixels (`display_frame`), in the order of the DICOM grayscale pipeline (PS3.4 N.2):
1. the stored values (Bits Stored, signed or not) as pydicom decodes them;
2. the Modality LUT: Modality LUT Sequence, else Rescale Slope/Intercept
   (`pydicom.pixels.apply_modality_lut`);
3. the first VOI: VOI LUT Sequence, else the first Window Center/Width with its VOI LUT Function
   (`pydicom.pixels.apply_voi_lut(..., index=0, prefer_lut=True)`); none when the header has none;
4. the output range of that step mapped linearly onto 0-255 and rounded: with a VOI LUT its
   nominal range `0 .. 2**bits - 1`; else (window or none) the range the modality step gives the
   stored range, the same range pydicom windows into. Without a window this is how 16-bit PNG
   and TIFF images are treated: their whole value range scaled to 8 bits;
5. MONOCHROME1 (white is 0) inverted, so vessels are dark in every image.
Color images (RGB, YBR converted to RGB by pydicom) keep their 3 channels, scaled from their
stored range the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.formats import IMAGE_SUFFIXES, ImageError
from pipeline.data.manifest import PRIMARY_LIMIT, normalise_angles

DICOM_SUFFIXES = (".dcm", ".dicom")
PRIMARY_STEP, SECONDARY_STEP = 15, 10
"""View-label bins in degrees: standard projections sit on these (RAO 30, LAO 45/60/90;
cranial and caudal 20/30/40)."""


class DicomError(ImageError):
    """A DICOM file that cannot be used; the message names the file and what to do."""


class AngleError(DicomError):
    """A C-arm angle in a DICOM header that is not one number in DICOM's range."""


ANGLE_TAGS = {"PositionerPrimaryAngle": "Positioner Primary Angle (0018,1510)",
              "PositionerSecondaryAngle": "Positioner Secondary Angle (0018,1511)"}


@dataclass(frozen=True)
class DicomInfo:
    """What the header of one DICOM file says (read without decoding its pixels)."""

    path: Path
    frames: int
    """Number of Frames (1 when absent)."""
    size: tuple[int, int]
    """(Rows, Columns): the (H, W) of every frame."""
    angles: tuple[float, float] | None
    """(Positioner Primary Angle (0018,1510), Positioner Secondary Angle (0018,1511)) in degrees,
    LAO and cranial positive, the primary in (-180, 180] (`normalise_angles`); None when either
    is absent."""
    group: str | None
    """Patient ID, else Study Instance UID: the split's grouping. Kept in memory, never written."""
    problem: str | None
    """Why the pixels cannot be decoded (no pixel data, a transfer syntax without a handler),
    else None."""


def is_dicom(path: str | Path) -> bool:
    """Whether `path` is a file with a DICOM suffix or the `DICM` preamble at byte 128 (a file
    with another image format's suffix is not looked into)."""
    path = Path(path)
    if not path.is_file() or path.suffix.lower() in IMAGE_SUFFIXES:
        return False
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with path.open("rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _read_dataset(path: Path, header_only: bool):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        # defer_size keeps Pixel Data unread in a header read, but still says it is there
        ds = pydicom.dcmread(path, defer_size="64 KB" if header_only else None,
                             force=path.suffix.lower() in DICOM_SUFFIXES)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError) as err:
        raise DicomError(f"{path}: not a readable DICOM file ({err})") from err
    if len(ds) == 0:  # force=True parses anything; a file with no element is not DICOM
        raise DicomError(f"{path}: not a readable DICOM file (no data elements)")
    return ds


def read_info(path: str | Path) -> DicomInfo:
    """The header facts of one DICOM file; raises `DicomError` when it cannot be parsed
    (`AngleError` for an angle that is not one number in DICOM's range)."""
    path = Path(path)
    ds = _read_dataset(path, header_only=True)
    angles = _header_angles(ds, path)
    group = str(ds.get("PatientID") or "") or str(ds.get("StudyInstanceUID") or "") or None
    return DicomInfo(path=path, frames=int(ds.get("NumberOfFrames") or 1),
                     size=(int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)),
                     angles=angles, group=group, problem=_pixel_problem(ds))


def _header_angles(ds, path: Path) -> tuple[float, float] | None:
    """(primary, secondary) from the header, normalised; None when either is absent."""
    from pydicom.multival import MultiValue

    values = {}
    for keyword, tag in ANGLE_TAGS.items():
        value = ds.get(keyword)
        if value is None or value == "":
            return None
        try:
            if isinstance(value, MultiValue | list | tuple):
                raise ValueError("several values")
            values[keyword] = float(value)
        except (TypeError, ValueError):
            shown = "\\".join(map(str, value)) if isinstance(value, MultiValue) else str(value)
            raise AngleError(f"{path}: {tag} is '{shown}', not one number of degrees; correct "
                             "the header (e.g. dcmodify) or remove the tag") from None
    try:
        return normalise_angles(*values.values())
    except ValueError as err:
        name = ANGLE_TAGS["PositionerPrimaryAngle" if str(err).startswith("primary")
                          else "PositionerSecondaryAngle"]
        raise AngleError(f"{path}: {name}: {err} (DICOM's range); correct the header "
                         "(e.g. dcmodify) or remove the tag") from None


def header_angles(path: Path) -> tuple[float, float] | None:
    """A DICOM image's C-arm angles from its header; None when `path` is not DICOM, has no
    angles or cannot be parsed (`check` reports the last two). An angle that is present but
    not usable raises `AngleError` naming the file and tag."""
    if not is_dicom(path):
        return None
    try:
        return read_info(path).angles
    except AngleError:
        raise
    except DicomError:
        return None


def _pixel_problem(ds) -> str | None:
    """Why `ds`'s pixels cannot be decoded here (and what to install), or None."""
    from pydicom.pixels.decoders.base import get_decoder
    from pydicom.uid import ImplicitVRLittleEndian

    if "PixelData" not in ds:
        floats = any(k in ds for k in ("FloatPixelData", "DoubleFloatPixelData"))
        return ("no Pixel Data (7FE0,0010)" + (" (float pixel data only)" if floats else "")
                + ": not an image this pipeline reads")
    meta = getattr(ds, "file_meta", None)
    syntax = (meta.get("TransferSyntaxUID") if meta is not None else None) or ImplicitVRLittleEndian
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        return (f"transfer syntax {syntax.name} ({syntax}) has no pydicom decoder: convert the "
                "file to an uncompressed transfer syntax first (e.g. `gdcmconv --raw` or "
                "dcmtk's `dcmdjpeg`)")
    if not decoder.is_available:
        needs = "; ".join(decoder.missing_dependencies) or "a pydicom pixel data plugin"
        return (f"transfer syntax {syntax.name} ({syntax}) needs a pixel data handler, none is "
                f"installed: pip install one of: {needs}")
    return None


def read_frames(path: str | Path) -> np.ndarray:
    """Every frame of a DICOM file for display: (N, H, W) or (N, H, W, 3) uint8 (see the
    module docstring for the grayscale pipeline). Raises `DicomError` naming the file."""
    path = Path(path)
    ds = _read_dataset(path, header_only=False)
    problem = _pixel_problem(ds)
    if problem is not None:
        raise DicomError(f"{path}: {problem}")
    try:
        stored = ds.pixel_array
    except Exception as err:  # noqa: BLE001 - any decoder failure names this file
        raise DicomError(f"{path}: pixel data cannot be decoded ({type(err).__name__}: "
                         f"{err})") from err
    bits = int(ds.get("BitsStored") or 0)
    if int(ds.get("PixelRepresentation", 0)) == 0 and 0 < bits < stored.dtype.itemsize * 8:
        stored = stored & np.array(2**bits - 1, dtype=stored.dtype)  # bits above High Bit
    color = int(ds.get("SamplesPerPixel", 1)) > 1
    if int(ds.get("NumberOfFrames") or 1) == 1:
        stored = stored[None]
    if stored.ndim != (4 if color else 3):
        raise DicomError(f"{path}: unexpected pixel array shape {stored.shape}")
    return display_frame(stored, ds)


def read_dicom_image(path: str | Path) -> np.ndarray:
    """A single-frame DICOM as (H, W) or (H, W, 3) uint8. A multi-frame file is refused with a
    message naming it: which frame to use is `import dicom`'s decision (it writes each as PNG)."""
    path = Path(path)
    info = read_info(path)
    if info.frames > 1:
        raise DicomError(
            f"{path}: multi-frame DICOM ({info.frames} frames); a manifest row takes one frame: "
            "run `sam3-vessel data import dicom` to write its frames as PNG")
    return read_frames(path)[0]


def display_frame(stored: np.ndarray, ds) -> np.ndarray:
    """Stored pixel values (any shape) -> uint8 display values of the same shape: Modality LUT,
    first VOI, linear scaling of the VOI's output range to 0-255, MONOCHROME1 inverted."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    if int(ds.get("SamplesPerPixel", 1)) > 1:
        low, high = _stored_range(ds)
        return _to_uint8(stored.astype(np.float64), low, high)
    values = apply_modality_lut(stored, ds)
    low, high = _modality_range(ds)
    voi = ds.get("VOILUTSequence")
    if voi and voi[0].get("LUTDescriptor") is not None and voi[0].get("LUTData") is not None:
        low, high = 0.0, float(2 ** int(voi[0].LUTDescriptor[2]) - 1)
        values = _apply_voi_lut_sequence(values, ds)
    else:
        values = apply_voi_lut(values, ds, index=0, prefer_lut=True)  # window, or nothing
    display = _to_uint8(np.asarray(values, dtype=np.float64), low, high)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        display = 255 - display
    return display


def _apply_voi_lut_sequence(values: np.ndarray, ds) -> np.ndarray:
    """The first VOI LUT of `ds` applied to integer `values` (`pydicom.pixels.apply_voi`).

    pydicom 3.0 indexes a LUT of 8-bit entries with a uint8 array, so inputs past 255 wrap
    around; the same entries declared 16-bit are looked up with a uint16 index instead.
    """
    import copy

    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_voi

    item = copy.deepcopy(ds.VOILUTSequence[0])
    entries, first, depth = (int(v) for v in item.LUTDescriptor)
    if depth == 8:
        item.LUTDescriptor = [entries, first, 16]
    holder = Dataset()
    holder.VOILUTSequence = [item]
    if hasattr(ds, "file_meta"):  # LUT data in OW words is read in the file's byte order
        holder.file_meta = ds.file_meta
    return apply_voi(np.rint(values).astype(np.int64), holder)


def _stored_range(ds) -> tuple[float, float]:
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 8)
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    return 0.0, float(2**bits - 1)


def _modality_range(ds) -> tuple[float, float]:
    """The range the modality step maps the stored range to (as `apply_windowing` takes it)."""
    lut = ds.get("ModalityLUTSequence")
    if lut:
        return 0.0, float(2 ** int(lut[0].LUTDescriptor[2]) - 1)
    low, high = _stored_range(ds)
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        low, high = sorted((low * slope + intercept, high * slope + intercept))
    return low, high


def _to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    scaled = (values - low) * (255.0 / max(high - low, 1e-12))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def view_label(primary: float, secondary: float) -> str:
    """A readable view from C-arm angles: the nearest standard projection.

    Primary rounded to the nearest `PRIMARY_STEP` degrees (LAO positive, RAO negative, 0 is
    `AP`, +-180 is `PA`: the same projection from either side), secondary to the nearest
    `SECONDARY_STEP` (CRA positive, CAU negative, 0 omitted):
    (44.6, 29) -> `LAO45_CRA30`, (-31, -18) -> `RAO30_CAU20`, (2, 0) -> `AP`.
    """
    p, s = _nearest(primary, PRIMARY_STEP), _nearest(secondary, SECONDARY_STEP)
    label = ("AP" if p == 0 else "PA" if abs(p) == PRIMARY_LIMIT
             else f"{'LAO' if p > 0 else 'RAO'}{abs(p)}")
    return label if s == 0 else f"{label}_{'CRA' if s > 0 else 'CAU'}{abs(s)}"


def _nearest(angle: float, step: int) -> int:
    """`angle` rounded to a multiple of `step`, halves away from zero (symmetric LAO/RAO)."""
    return int(math.copysign(math.floor(abs(angle) / step + 0.5) * step, angle))
