"""Check a manifest before any GPU time: read every row and report every problem at once.

Errors (the manifest cannot be used as is): missing or unreadable files, images, masks or FOV masks
that do not decode (e.g. truncated), an image and its mask or FOV of different sizes, an empty FOV,
duplicate images (same sha256), a required mask missing; for rows from DICOM (a `source` column, or
a DICOM image): a source that is missing, has no pixel data or a transfer syntax without a handler
(named), a frame number past its last frame. Warnings: empty masks, masks more than half vessel
(`MOSTLY_VESSEL`), views in val that train never saw, a DICOM file without C-arm angles (once
per file). Infos: masks that are not plain 0/1 or 0/255 binary, and how they were binarised.
"""

from __future__ import annotations

import re
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.data.dicom import DicomError, DicomInfo, is_dicom, read_info
from pipeline.data.images import ImageError, read_image, read_mask
from pipeline.data.manifest import UNKNOWN_VIEW, Sample, file_sha256
from pipeline.errors import UserError

_LEVELS = ("errors", "warnings", "infos")
MOSTLY_VESSEL = 0.5
"""A mask with more vessel than this share of its pixels is warned about: vessels cover about
10% of a fundus or angiography image, so such a mask is inverted or misread."""
_VALUES = re.compile(r"values \[([\d, ]*)\]")


class ManifestCheckError(UserError, ValueError):
    """A manifest whose check found errors; the message is the full report."""


@dataclass(frozen=True)
class Problem:
    """One finding: the manifest row (1-based, header excluded), the file, what is wrong."""

    row: int
    path: Path | None
    message: str

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path is not None else ""
        return f"row {self.row}: {where}{self.message}"


@dataclass
class CheckReport:
    """Everything `check_manifest` found, by level, and each sample's key (sha256 of its image;
    None where the image could not be read)."""

    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    infos: list[Problem] = field(default_factory=list)
    keys: list[str | None] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when there are no errors (warnings and infos allowed)."""
        return not self.errors

    def format(self, limit: int | None = None) -> str:
        """A human-readable report; at most `limit` lines per level when given."""
        counts = ", ".join(f"{len(getattr(self, level))} {level}" for level in _LEVELS)
        lines = [f"manifest check: {len(self.keys)} rows, {counts}"]
        for level in _LEVELS:
            problems = getattr(self, level)
            if not problems:
                continue
            lines.append(f"{level}:")
            shown = problems if limit is None else problems[:limit]
            lines.extend(f"  {problem}" for problem in shown)
            if len(shown) < len(problems):
                lines.append(f"  ... and {len(problems) - len(shown)} more {level}")
        return "\n".join(lines)

    def raise_if_errors(self) -> None:
        """Raise `ManifestCheckError` with the report when there are errors."""
        if self.errors:
            raise ManifestCheckError(self.format())


@dataclass
class _RowResult:
    key: str | None = None
    found: dict[str, list[Problem]] = field(default_factory=lambda: defaultdict(list))


def check_manifest(samples: list[Sample], *, require_masks: bool,
                   threads: int = 8) -> CheckReport:
    """Read every row (images hashed and decoded, masks decoded) and collect all problems."""
    with ThreadPoolExecutor(max(1, threads)) as pool:
        results = list(pool.map(lambda s: _check_row(s, require_masks), samples))
    report = CheckReport(keys=[result.key for result in results])
    for result in results:
        for level in _LEVELS:
            getattr(report, level).extend(result.found[level])
    report.errors.extend(_duplicates(samples, report.keys))
    dicom_errors, dicom_warnings = _dicom_sources(samples)
    report.errors.extend(dicom_errors)
    report.warnings.extend(dicom_warnings)
    report.warnings.extend(_unseen_views(samples))
    for level in _LEVELS:
        getattr(report, level).sort(key=lambda problem: problem.row)
    return report


def _check_row(sample: Sample, require_masks: bool) -> _RowResult:
    """Hash and decode one row's image and mask; the findings and the image's key."""
    result = _RowResult()
    errors, image_size = result.found["errors"], None
    try:
        result.key = file_sha256(sample.image)
        image_size = tuple(read_image(sample.image).shape[1:])
    except Exception as err:  # noqa: BLE001 - any decoder failure is this row's error
        errors.append(Problem(sample.row, sample.image, _reason(err)))
    if sample.fov is not None:
        errors.extend(_check_fov(sample, image_size))
    if sample.mask is None:
        if require_masks:
            errors.append(Problem(sample.row, sample.image, "no mask given (masks are required)"))
        return result
    try:
        mask, rule = read_mask(sample.mask)
    except Exception as err:  # noqa: BLE001
        errors.append(Problem(sample.row, sample.mask, _reason(err)))
        return result
    if image_size is not None and mask.shape != image_size:
        errors.append(Problem(sample.row, sample.mask, (
            f"mask is {_hw(mask.shape)} but its image {sample.image.name} is {_hw(image_size)}")))
    if not mask.any():
        result.found["warnings"].append(Problem(sample.row, sample.mask, "mask is empty"))
    elif mask.mean() > MOSTLY_VESSEL:
        result.found["warnings"].append(Problem(sample.row, sample.mask, (
            f"mask is {mask.mean():.0%} vessel: vessels cover far less of an image; is it "
            "inverted (vessels black on white)?")))
    if not _plain_binary(rule):
        result.found["infos"].append(Problem(sample.row, sample.mask, f"mask binarised: {rule}"))
    return result


def _check_fov(sample: Sample, image_size: tuple | None) -> list[Problem]:
    """The errors of a row's field-of-view mask: unreadable, another size, or empty."""
    try:
        fov, _ = read_mask(sample.fov)
    except Exception as err:  # noqa: BLE001
        return [Problem(sample.row, sample.fov, f"field of view {_reason(err)}")]
    if image_size is not None and fov.shape != image_size:
        return [Problem(sample.row, sample.fov, (
            f"field of view is {_hw(fov.shape)} but its image {sample.image.name} "
            f"is {_hw(image_size)}"))]
    if not fov.any():
        return [Problem(sample.row, sample.fov, "field of view is empty (nothing to score)")]
    return []


def _reason(err: Exception) -> str:
    """The error's message without its leading file name (the Problem carries the path)."""
    if isinstance(err, FileNotFoundError):
        return "file not found"
    if isinstance(err, OSError):
        return f"cannot be read ({err.strerror or err})"
    if isinstance(err, ImageError):
        _, sep, rest = str(err).partition(": ")
        return rest if sep else str(err)
    return f"cannot be decoded ({type(err).__name__}: {err})"


def _hw(shape: tuple) -> str:
    return f"{shape[0]}x{shape[1]} (HxW)"


def _plain_binary(rule: str) -> bool:
    """Whether `read_mask`'s description says the mask held only 0/1 or only 0/255."""
    if rule.startswith("binary"):
        return True
    match = _VALUES.match(rule)
    if match is None:
        return False
    values = {int(v) for v in match.group(1).replace(",", " ").split()}
    return values <= {0, 255}


def _duplicates(samples: list[Sample], keys: list[str | None]) -> list[Problem]:
    """An error on every row whose image bytes equal those of an earlier row."""
    first: dict[str, Sample] = {}
    problems = []
    for sample, key in zip(samples, keys, strict=True):
        if key is None:
            continue
        if key in first:
            earlier = first[key]
            problems.append(Problem(sample.row, sample.image, (
                f"duplicate of row {earlier.row} ({earlier.image}): same sha256 {key[:12]}")))
        else:
            first[key] = sample
    return problems


def _unseen_views(samples: list[Sample]) -> list[Problem]:
    """A warning per view found in val rows but in no train row (when there are train rows)."""
    train = {s.view or UNKNOWN_VIEW for s in samples if s.is_train}
    if not train:
        return []
    unseen: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        view = sample.view or UNKNOWN_VIEW
        if sample.split == "val" and view not in train:
            unseen[view].append(sample)
    problems = []
    for view, rows in unseen.items():
        listed = ", ".join(str(s.row) for s in rows[:10]) + (", ..." if len(rows) > 10 else "")
        problems.append(Problem(rows[0].row, rows[0].image, (
            f"view {view!r} is in {len(rows)} val row(s) ({listed}) but in no train row")))
    return problems


def _dicom_sources(samples: list[Sample]) -> tuple[list[Problem], list[Problem]]:
    """Errors and warnings of the DICOM files rows come from (`source`, or the image itself):
    once per file a source missing or undecodable and missing C-arm angles; per row a frame past
    the last. A DICOM image's own decoding errors are the row check's."""
    by_file: dict[Path, list[Sample]] = defaultdict(list)
    for sample in samples:
        if sample.source is not None:
            by_file[sample.source].append(sample)
        elif is_dicom(sample.image):
            by_file[sample.image].append(sample)
    errors, warnings = [], []
    for path, rows in by_file.items():
        first, direct = rows[0], rows[0].source is None
        if not path.is_file():
            errors.append(Problem(first.row, path, "DICOM source file not found"))
            continue
        try:
            info = read_info(path)
        except DicomError as err:
            if not direct:
                errors.append(Problem(first.row, path, _reason(err)))
            continue
        if info.problem is not None and not direct:
            errors.append(Problem(first.row, path, info.problem))
        for sample in rows:
            errors += [Problem(sample.row, where, message) for where, message in
                       mask_problems(info, sample.frame or 1, None)]
        if info.angles is None and all(sample.angles is None for sample in rows):
            warnings.append(Problem(first.row, path, (
                f"no C-arm angles (0018,1510/1511): its {len(rows)} row(s) have no angles and "
                "no view from them")))
    return errors, warnings


def mask_problems(info: DicomInfo, frame: int, mask: Path | None) -> list[tuple[Path, str]]:
    """(file, problem) for frame `frame` of `info`'s file and its mask: a frame number past the
    last frame, a mask that does not decode or differs in size from the frames."""
    if frame < 1:
        return [(mask or info.path, f"frame {frame}: DICOM frame numbers start at 1 "
                 f"({info.path} has frames 1-{info.frames})")]
    if frame > info.frames:
        return [(mask or info.path, f"frame {frame} is past the last frame of {info.path} "
                 f"(frames 1-{info.frames})")]
    if mask is None:
        return []
    try:
        shape = read_mask(mask)[0].shape
    except ImageError as err:
        return [(mask, str(err).removeprefix(f"{mask}: "))]
    if shape != info.size:
        return [(mask, f"mask is {shape[0]}x{shape[1]} (HxW) but the frames of {info.path} are "
                 f"{info.size[0]}x{info.size[1]}")]
    return []
