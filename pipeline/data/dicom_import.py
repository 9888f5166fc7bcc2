"""`import dicom`: a folder of DICOM runs (e.g. XA cine) -> PNG frames + a manifest.

Each DICOM file under the folder (`pipeline.data.dicom.is_dicom`) gives one row per frame that has a
mask, or per frame with `all_frames`. Frames are written once, as lossless 8-bit PNG
(`pipeline.data.dicom.display_frame`), at `<frames_dir>/<subfolder>/<file stem>_<frame>.png`, so a
frame's cache key is the sha256 of a file that does not change between imports.

Masks pair with frames by `<file stem>_<frame number>.png` (any image format; frame numbers from
1 as in DICOM, zero padding allowed), or by `mask_regex` with groups `key` and `frame` against the
mask's file name, the key being the DICOM file's stem or `image_regex`'s first group.

Rows carry `primary_angle, secondary_angle` (0018,1510 / 0018,1511), the view label
`pipeline.data.dicom.view_label`, `source, frame`, and a split grouped by Patient ID (else Study
Instance UID, else the file), so the frames of one patient never straddle train and val. Nothing
else from the header is written: no names, identifiers or dates.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from pipeline.data.checks import mask_problems
from pipeline.data.dicom import (
    DicomError,
    DicomInfo,
    is_dicom,
    read_frames,
    read_info,
    view_label,
)
from pipeline.data.formats import IMAGE_SUFFIXES
from pipeline.data.importers import (
    DatasetImportError,
    check_ratio,
    compile_regex,
    first_group,
    list_problems,
)
from pipeline.data.manifest import write_manifest
from pipeline.data.splits import split_by_group
from pipeline.durable import write_atomically

MASK_PATTERN = r"^(?P<key>.+)_(?P<frame>\d+)\.[^.]+$"
SHOWN = 3


@dataclass
class DicomImport:
    """What `import_dicom` wrote: the manifest, and notes for the user (files without angles,
    files without any mask), each naming the file."""

    manifest: Path
    notes: list[str] = field(default_factory=list)


def import_dicom(dicom_dir: str | Path, out_csv: str | Path, *, frames_dir: str | Path,
                 masks_dir: str | Path | None = None, all_frames: bool = False,
                 image_regex: str | None = None, mask_regex: str | None = None,
                 split_ratio: float | None = 0.8, split_column: str | None = None,
                 seed: int = 0) -> DicomImport:
    """Write the frames of every DICOM file under `dicom_dir` as PNG and a manifest of them.

    Every problem (unreadable file, no pixel data, a transfer syntax without a handler, a mask
    frame number past the last frame, a mask whose size differs from the frames, a mask matching
    no DICOM file) is listed at once, before anything is written. `split_column` as in
    `import_folder`: one split for every row instead of the grouped `split_ratio` split.
    """
    dicom_dir, frames_dir = Path(dicom_dir).resolve(), Path(frames_dir).resolve()
    masks_root = Path(masks_dir).resolve() if masks_dir is not None else None
    check_ratio(split_ratio)
    if masks_root is None and not all_frames:
        raise DatasetImportError("give masks (--masks) or import every frame (--all-frames)")
    files = _dicom_files(dicom_dir)
    infos, problems = [], []
    for path in files:
        try:
            infos.append(read_info(path))
        except DicomError as err:
            problems.append(str(err))
    masks: dict[Path, dict[int, Path]] = {}
    if masks_root is not None:  # keys only pair masks: files may share a stem without masks
        keys = _keys(infos, compile_regex(image_regex, "image regex"))
        masks, unmatched = _pair_masks(keys, masks_root, compile_regex(mask_regex, "mask regex"))
        problems += unmatched
    problems += [f"{info.path}: {info.problem}" for info in infos if info.problem]
    problems += _mask_problems(infos, masks)
    if problems:
        raise DatasetImportError(list_problems("DICOM problems (nothing was written)", problems))
    result = DicomImport(manifest=Path(out_csv))
    rows, groups, seen = [], [], {}
    for info in infos:
        frames = range(1, info.frames + 1) if all_frames else sorted(masks.get(info.path, {}))
        if not frames:
            result.notes.append(f"{info.path}: no mask for any of its {info.frames} frame(s); "
                                "not imported (--all-frames keeps every frame)")
            continue
        if info.angles is None:
            result.notes.append(f"{info.path}: no Positioner Primary/Secondary Angle "
                                "(0018,1510/1511); its rows have no angles and an empty view")
        new, repeated = _frame_rows(info, frames, masks.get(info.path, {}), dicom_dir,
                                    frames_dir, seen)
        result.notes += _repeat_notes(info, repeated)
        rows += new
        groups += [info.group or str(info.path)] * len(new)
    if not rows:
        raise DatasetImportError(list_problems(f"{dicom_dir}: no frame to import", result.notes))
    _splits(rows, groups, split_ratio, split_column, seed)
    result.manifest = write_manifest(out_csv, rows)
    return result


def _dicom_files(folder: Path) -> list[Path]:
    """Every DICOM file under `folder` (recursively, sorted; masks and frames may be inside)."""
    if not folder.is_dir():
        raise DatasetImportError(f"{folder}: folder not found")
    files = [path for path in sorted(folder.rglob("*")) if is_dicom(path)]
    if not files:
        raise DatasetImportError(f"{folder}: no DICOM files (a `.dcm` suffix or the DICM "
                                 "preamble at byte 128)")
    return files


def _keys(infos: list[DicomInfo], pattern: re.Pattern | None) -> dict[str, DicomInfo]:
    """The DICOM file of each key (stem, or the regex's first group); a repeated key is an
    error, since its masks could belong to either file."""
    by_key: dict[str, list[DicomInfo]] = defaultdict(list)
    for info in infos:
        key = info.path.stem if pattern is None else first_group(pattern, info.path.name)
        if key is not None:
            by_key[key].append(info)
    repeated = [f"key {key!r}: " + ", ".join(str(i.path) for i in group)
                for key, group in by_key.items() if len(group) > 1]
    if repeated:
        raise DatasetImportError(list_problems(
            "DICOM files share a mask key (rename them or pass --image-regex)", repeated))
    return {key: group[0] for key, group in by_key.items()}


def _pair_masks(keys: dict[str, DicomInfo], masks_dir: Path, pattern: re.Pattern | None
                ) -> tuple[dict[Path, dict[int, Path]], list[str]]:
    """{DICOM path: {frame number: mask}}, and the problems (masks that pair with nothing)."""
    pattern = pattern or re.compile(MASK_PATTERN)
    if not {"key", "frame"} <= set(pattern.groupindex):
        raise DatasetImportError(f"mask regex {pattern.pattern!r} needs the groups "
                                 "(?P<key>...) and (?P<frame>...)")
    if not masks_dir.is_dir():
        raise DatasetImportError(f"{masks_dir}: folder not found")
    pairs: dict[Path, dict[int, Path]] = defaultdict(dict)
    problems = []
    for mask in sorted(p for p in masks_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        match = pattern.search(mask.name)
        if match is None:
            problems.append(f"{mask}: name does not match {pattern.pattern!r} "
                            "(<DICOM file stem>_<frame number>.png)")
        elif match.group("key") not in keys:
            problems.append(f"{mask}: no DICOM file with key {match.group('key')!r}")
        else:
            frame, path = int(match.group("frame")), keys[match.group("key")].path
            if frame in pairs[path]:
                problems.append(f"{mask}: frame {frame} of {path.name} already has the mask "
                                f"{pairs[path][frame]}")
            pairs[path][frame] = mask
    return dict(pairs), problems


def _mask_problems(infos: list[DicomInfo], masks: dict[Path, dict[int, Path]]) -> list[str]:
    """Masks numbered past the file's last frame, or of another size than its frames."""
    problems = []
    for info in infos:
        for frame, mask in sorted(masks.get(info.path, {}).items()):
            problems += [f"{path}: {message}" for path, message in mask_problems(info, frame, mask)]
    return problems


def _frame_rows(info: DicomInfo, frames, masks: dict[int, Path], dicom_dir: Path,
                frames_dir: Path, seen: dict[str, tuple[Path, int]]
                ) -> tuple[list[dict], list[tuple[int, Path, int, bool]]]:
    """Write the frames as PNG (only where the file differs); their manifest rows, and the
    frames left out as (frame, earlier file, its frame, had a mask): pixels equal to a frame
    already in `seen` (sha256 of the PNG -> file, frame), which a manifest may not hold twice
    (the same image in train and val leaks; `check` refuses it)."""
    pixels = read_frames(info.path)  # (N, H, W[, 3]) uint8
    folder = frames_dir / info.path.parent.relative_to(dicom_dir)
    view = {} if info.angles is None else {
        "primary_angle": info.angles[0], "secondary_angle": info.angles[1],
        "view": view_label(*info.angles)}
    rows, repeated = [], []
    for frame in frames:
        data = _png(pixels[frame - 1])
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:
            repeated.append((frame, *seen[digest], frame in masks))
            continue
        seen[digest] = (info.path, frame)
        png = folder / f"{info.path.stem}_{frame}.png"
        _write_once(png, data)
        rows.append({"image": png, "mask": masks.get(frame), "view": None, **view,
                     "source": info.path, "frame": frame})
    return rows, repeated


def _repeat_notes(info: DicomInfo, repeated: list[tuple[int, Path, int, bool]]) -> list[str]:
    """One note per earlier file whose frames `info`'s file repeats, naming the frames."""
    by_file: dict[Path, list[tuple[int, int, bool]]] = defaultdict(list)
    for frame, earlier, its_frame, had_mask in repeated:
        by_file[earlier].append((frame, its_frame, had_mask))
    notes = []
    for earlier, pairs in by_file.items():
        shown = ", ".join(f"{f} (= frame {e})" for f, e, _ in pairs[:SHOWN])
        more = f", and {len(pairs) - SHOWN} more" if len(pairs) > SHOWN else ""
        masked = sum(m for _, _, m in pairs)
        notes.append(f"{info.path}: {len(pairs)} frame(s) not imported, the same pixels as "
                     f"frames of {earlier} (one image twice would leak between splits): "
                     f"frame {shown}{more}{f'; {masked} of them had a mask' if masked else ''}")
    return notes


def _png(pixels) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_once(path: Path, data: bytes) -> None:
    """Write the PNG `data` unless `path` already holds exactly those bytes (keeps its mtime)."""
    if path.is_file() and path.read_bytes() == data:
        return
    write_atomically(path, data)


def _splits(rows: list[dict], groups: list[str], ratio: float | None, fixed: str | None,
            seed: int) -> None:
    """Each row's split: `fixed` on every row, else whole groups by `ratio`, else none."""
    if fixed is not None or ratio is None:
        for row in rows:
            row["split"] = fixed or None
        return
    for row, split in zip(rows, split_by_group(groups, ratio, seed), strict=True):
        row["split"] = split
