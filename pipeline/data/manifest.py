"""The manifest: a CSV with columns `image, mask, view, split`, one row per sample.

`mask`, `view` and `split` may be empty (extraction needs only images). Paths are absolute or
relative to the manifest's folder. A sample's key is the hex sha256 of its image file's bytes, so
an image replaced on disk gets a new key and never inherits old features.

Nothing is dropped silently: a column outside `KNOWN_COLUMNS` is an error naming the closest
known one (`Split`, `masks`, `veiw`), as is a split value outside `SPLITS`. The file is UTF-8
(a spreadsheet's byte-order mark is fine) or UTF-16 with its byte-order mark.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pipeline.durable import write_atomically
from pipeline.errors import UserError

COLUMNS = ("image", "mask", "view", "split")
# Optional: C-arm primary (LAO+/RAO-) and secondary (CRA+/CAU-) angles in degrees.
ANGLE_COLUMNS = ("primary_angle", "secondary_angle")
# Optional: the DICOM file and frame (from 1) a row's image was written from (`import dicom`).
SOURCE_COLUMNS = ("source", "frame")
# Optional: a field-of-view mask per row (DRIVE, CHASE_DB1 and HRF ship them); scores count
# only the pixels inside it.
FOV_COLUMN = "fov"
KNOWN_COLUMNS = COLUMNS + ANGLE_COLUMNS + SOURCE_COLUMNS + (FOV_COLUMN,)
"""Every column a manifest may have; any other is an error."""
SPLITS = {"train": "train", "training": "train", "val": "val", "valid": "val",
          "validation": "val", "test": "test"}
"""Accepted `split` values (case and surrounding spaces ignored) -> what they mean. An empty
split trains; `test` rows are held out: neither trained on nor validated."""
UNKNOWN_VIEW = "<unknown>"
PRIMARY_LIMIT, SECONDARY_LIMIT = 180.0, 90.0
"""C-arm angle ranges in degrees, as DICOM defines them (PS3.3 C.8.7.5): primary (LAO+/RAO-)
-180..180, secondary (CRA+/CAU-) -90..90."""


class ManifestError(UserError, ValueError):
    """A manifest that cannot be read; the message names the file and row."""


@dataclass(frozen=True)
class Sample:
    row: int
    """1-based data row in the CSV (the header is row 0)."""
    image: Path
    mask: Path | None
    view: str | None
    split: str | None
    angles: tuple[float, float] | None = None
    """(primary, secondary) C-arm angles in degrees, when the manifest has them."""
    source: Path | None = None
    """The DICOM file the image is a frame of, when the manifest says so."""
    frame: int | None = None
    """That frame's number in `source`, from 1 as in DICOM."""
    fov: Path | None = None
    """Field-of-view mask (optional column `fov`): every score counts only pixels inside it."""

    @property
    def is_train(self) -> bool:
        """Whether the row trains: split `train`, or no split (the one definition)."""
        return (self.split or "train") == "train"


def read_manifest(path: str | Path) -> list[Sample]:
    """Parse a manifest CSV; paths resolved against its folder, splits as `SPLITS` maps them."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    reader = csv.DictReader(io.StringIO(_decode(path), newline=""))
    header = [h.strip() for h in (reader.fieldnames or [])]
    _check_header(path, header)
    samples = []
    for number, raw in enumerate(reader, start=1):
        if None in raw:
            raise ManifestError(f"{path}: row {number} has more fields than the header "
                                f"({len(header)}); quote values that hold commas")
        record = {k.strip(): (v or "").strip() for k, v in raw.items()}
        if not record.get("image"):
            raise ManifestError(f"{path}: row {number} has an empty `image`")
        samples.append(Sample(
            row=number,
            image=_resolve(path.parent, record["image"]),
            mask=_resolve(path.parent, record["mask"]) if record.get("mask") else None,
            view=record.get("view") or None,
            split=_split(path, number, record.get("split", "")),
            angles=_angles(path, number, record),
            **_source(path, number, record),
            fov=_resolve(path.parent, record["fov"]) if record.get("fov") else None,
        ))
    if not samples:
        raise ManifestError(f"{path}: no rows")
    return samples


def _decode(path: Path) -> str:
    """The manifest's text: UTF-8 (with or without a BOM) or UTF-16 with a BOM."""
    data = path.read_bytes()
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return data.decode("utf-16")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ManifestError(
            f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}); save it as "
            "UTF-8 (\"CSV UTF-8\" in spreadsheet programs)") from None


def _check_header(path: Path, header: list[str]) -> None:
    unknown = [h for h in header if h not in KNOWN_COLUMNS]
    if unknown:
        hints = []
        for column in unknown:
            near = [k for k in KNOWN_COLUMNS if k == column.lower() or k == column.lower()
                    .rstrip("s")] or difflib.get_close_matches(column.lower(), KNOWN_COLUMNS, 1)
            hints.append(f"{column!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
        raise ManifestError(f"{path}: unknown column {', '.join(hints)}; the known columns are "
                            f"{', '.join(KNOWN_COLUMNS)}")
    if "image" not in header:
        raise ManifestError(f"{path}: no `image` column (header: {header}; expected {COLUMNS})")
    if len(set(header)) != len(header):
        raise ManifestError(f"{path}: a column appears twice (header: {header})")


def _split(path: Path, number: int, value: str) -> str | None:
    if not value:
        return None
    if value.lower() not in SPLITS:
        raise ManifestError(f"{path}: row {number} has split {value!r}; use one of "
                            f"{', '.join(sorted(SPLITS))} (any case) or leave it empty (train)")
    return SPLITS[value.lower()]


def write_manifest(path: str | Path, rows: list[dict]) -> Path:
    """Write rows (dicts with the COLUMNS, optionally angles and `fov`) as a manifest; paths
    made relative where possible."""
    path = Path(path)
    handle = io.StringIO(newline="")
    optional = ANGLE_COLUMNS + SOURCE_COLUMNS
    columns = COLUMNS + tuple(c for c in optional if any(c in r for r in rows))
    columns += (FOV_COLUMN,) if any(r.get(FOV_COLUMN) for r in rows) else ()
    writer = csv.DictWriter(handle, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        out = {c: "" if row.get(c) is None else row[c] for c in columns}
        for column in ("image", "mask", "source", FOV_COLUMN):
            if out.get(column):
                out[column] = _relative(path.parent, Path(out[column]))
        writer.writerow(out)
    write_atomically(path, handle.getvalue().encode("utf-8"))  # the folder is made there
    return path


def normalise_angles(primary: float, secondary: float) -> tuple[float, float]:
    """C-arm angles checked against `PRIMARY_LIMIT` / `SECONDARY_LIMIT`, the primary in
    (-180, 180]: -180 is the same projection as 180 and becomes 180. A non-finite angle or one
    out of range raises ValueError naming it (callers add the file and row or tag)."""
    for name, value, limit in (("primary", primary, PRIMARY_LIMIT),
                               ("secondary", secondary, SECONDARY_LIMIT)):
        if not math.isfinite(value):
            raise ValueError(f"{name} angle {value} is not a finite number of degrees")
        if abs(value) > limit:
            raise ValueError(f"{name} angle {value:g} is outside -{limit:g}..{limit:g} degrees")
    return (PRIMARY_LIMIT if primary == -PRIMARY_LIMIT else float(primary)), float(secondary)


def _angles(path: Path, number: int, record: dict) -> tuple[float, float] | None:
    values = [record.get(c, "") for c in ANGLE_COLUMNS]
    if not any(values):
        return None
    try:
        angles = float(values[0] or 0.0), float(values[1] or 0.0)
    except ValueError as err:
        raise ManifestError(f"{path}: row {number} has a non-numeric angle ({err})") from err
    try:
        return normalise_angles(*angles)
    except ValueError as err:
        raise ManifestError(f"{path}: row {number}: {err}") from err


def _source(path: Path, number: int, record: dict) -> dict:
    if not record.get("source"):
        return {}
    try:
        frame = int(record.get("frame") or 1)
    except ValueError as err:
        raise ManifestError(f"{path}: row {number} has a non-integer frame ({err})") from err
    return {"source": _resolve(path.parent, record["source"]), "frame": frame}


def _resolve(folder: Path, value: str) -> Path:
    candidate = Path(value).expanduser()
    return candidate if candidate.is_absolute() else (folder / candidate).resolve()


def _relative(folder: Path, target: Path) -> str:
    try:
        return str(target.resolve().relative_to(folder.resolve()))
    except ValueError:
        return str(target.resolve())


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sample_keys(samples: list[Sample], threads: int = 8) -> list[str]:
    """The key of each sample (sha256 of its image file), in order."""
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda s: file_sha256(s.image), samples))
