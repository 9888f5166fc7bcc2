"""The folder importer, and what every importer shares: keys and views from file names.

`import_folder` turns a folder of images (with an optional folder of masks, and one of
field-of-view masks, paired by a key taken from the file names) into a manifest CSV (see
`pipeline.data.manifest`). It fills the `view` column (from a subfolder, a file name regex, or
C-arm angles in the file name such as `LAO44_CRA29`), the optional angle columns, and a seeded
train/val split (`pipeline.data.splits`) that can keep groups (patients) together. The COCO
importer (`pipeline.data.coco`) and the DICOM one (`pipeline.data.dicom_import`) use the
helpers here for regexes, views and split groups.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from pipeline.data.dicom import header_angles, view_label
from pipeline.data.images import is_image_file
from pipeline.data.manifest import write_manifest
from pipeline.data.splits import assign_splits
from pipeline.errors import UserError

_NUMBER = r"(\d+(?:\.\d+)?)"
_PRIMARY = re.compile(rf"(?<![A-Za-z])(LAO|RAO)[ _-]?{_NUMBER}", re.IGNORECASE)
_SECONDARY = re.compile(rf"(?<![A-Za-z])(CRAN?|CAUD?)[ _-]?{_NUMBER}", re.IGNORECASE)


class DatasetImportError(UserError, ValueError):
    """A dataset that cannot be imported; the message names the files and the problem."""


# --- names, keys, views and angles --------------------------------------------------------------


def first_group(pattern: re.Pattern, name: str) -> str | None:
    """The first capture group of `pattern` searched in `name` (or the whole match), or None."""
    match = pattern.search(name)
    if match is None:
        return None
    return match.group(1) if pattern.groups else match.group(0)


def compile_regex(pattern: str | None, option: str) -> re.Pattern | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as err:
        raise DatasetImportError(f"{option} {pattern!r} is not a valid regex ({err})") from err


def parse_angles(name: str) -> tuple[float, float] | None:
    """C-arm (primary, secondary) angles in degrees from a name like `LAO44_CRA29`, or None.

    LAO is positive and RAO negative; CRA is positive and CAU negative. A name with only one of
    the two angles gets 0 for the other.
    """
    primary, secondary = _PRIMARY.search(name), _SECONDARY.search(name)
    if primary is None and secondary is None:
        return None
    p = s = 0.0
    if primary is not None:
        p = float(primary.group(2)) * (1 if primary.group(1).upper() == "LAO" else -1)
    if secondary is not None:
        s = float(secondary.group(2)) * (1 if secondary.group(1).upper().startswith("CRA") else -1)
    return p, s


def _angle_label(name: str) -> str | None:
    """The categorical view of a name with C-arm angles (`LAO_CRA`, `RAO`, ...), or None."""
    parts = [m.group(1).upper()[:3] for m in (_PRIMARY.search(name), _SECONDARY.search(name)) if m]
    return "_".join(parts) or None


def view_fields(path: Path, root: Path, view_regex: re.Pattern | None,
                 from_subfolder: bool) -> dict:
    """The `view` and angle columns of one image (angle columns only when the name has them)."""
    fields: dict = {}
    angles, header = parse_angles(path.name), header_angles(path)
    if angles is not None or header is not None:
        fields["primary_angle"], fields["secondary_angle"] = angles or header
    if from_subfolder:
        fields["view"] = path.parent.name if path.parent != root else None
    elif view_regex is not None:
        fields["view"] = first_group(view_regex, path.name)
    elif angles is None and header is not None:
        fields["view"] = view_label(*header)
    else:
        fields["view"] = _angle_label(path.name)
    return fields



def encode_angles(primary_deg: float, secondary_deg: float) -> np.ndarray:
    """View conditioning of C-arm angles: `[sin p, cos p, sin s, cos s]`, float32, shape (4,)."""
    p, s = np.deg2rad(float(primary_deg)), np.deg2rad(float(secondary_deg))
    return np.array([np.sin(p), np.cos(p), np.sin(s), np.cos(s)], dtype=np.float32)


# --- finding and pairing files ------------------------------------------------------------------


def _list_images(folder: Path, exclude: Path | None = None) -> list[Path]:
    """Every image file under `folder` (recursively, sorted), skipping the `exclude` folder."""
    if not folder.is_dir():
        raise DatasetImportError(f"{folder}: folder not found")
    files = []
    for path in sorted(folder.rglob("*")):
        if exclude is not None and path.is_relative_to(exclude):
            continue
        if is_image_file(path):
            files.append(path)
    return files


def _keyed(files: list[Path], pattern: re.Pattern | None) -> list[tuple[str, Path]]:
    """(key, file) per file: the stem, or the regex's first group; non-matching files dropped."""
    if pattern is None:
        return [(f.stem, f) for f in files]
    pairs = [(first_group(pattern, f.name), f) for f in files]
    return [(key, f) for key, f in pairs if key is not None]


def _pair_masks(images: list[tuple[str, Path]], masks: list[tuple[str, Path]],
                images_dir: Path, masks_dir: Path) -> tuple[dict[Path, Path], list[str]]:
    """Map each image to its mask by key; where a key repeats, also by relative subfolder.

    Returns the pairs and the problems (ambiguous pairings); unpaired images are simply absent.
    """
    by_key: dict[str, list[Path]] = defaultdict(list)
    for key, mask in masks:
        by_key[key].append(mask)
    image_count = defaultdict(int)
    for key, _ in images:
        image_count[key] += 1
    pairs, problems = {}, []
    for key, image in images:
        candidates = by_key.get(key, [])
        if len(candidates) > 1 or image_count[key] > 1:
            folder = image.parent.relative_to(images_dir)
            candidates = [m for m in candidates if m.parent.relative_to(masks_dir) == folder]
        if len(candidates) > 1:
            names = ", ".join(str(m) for m in candidates)
            problems.append(f"{image}: key {key!r} matches several masks ({names})")
        elif candidates:
            pairs[image] = candidates[0]
    return pairs, problems


def list_problems(title: str, lines: list[str], limit: int = 20) -> str:
    shown = "\n  ".join(lines[:limit])
    more = f"\n  ... and {len(lines) - limit} more" if len(lines) > limit else ""
    return f"{title} ({len(lines)}):\n  {shown}{more}"


# --- splits ---------------------------------------------------------------------------------------


def check_ratio(split_ratio: float | None) -> None:
    if split_ratio is not None and not 0.0 <= split_ratio <= 1.0:
        raise DatasetImportError(f"split ratio {split_ratio} is outside [0, 1]")


def split_groups(names: list[str], group_regex: str | None) -> list[str] | None:
    """The split group of each file name: `group_regex`'s first capture (None without a regex);
    a name it does not match is an error, listing every such name."""
    pattern = compile_regex(group_regex, "group regex")
    if pattern is None:
        return None
    groups = [first_group(pattern, name) for name in names]
    missing = [name for name, group in zip(names, groups, strict=True) if group is None]
    if missing:
        raise DatasetImportError(list_problems(
            f"group regex {group_regex!r} matches no group in these file names", missing))
    return groups


# --- the folder importer ------------------------------------------------------------------------


def import_folder(images_dir: str | Path, out_csv: str | Path, *,
                  masks_dir: str | Path | None = None,
                  image_regex: str | None = None, mask_regex: str | None = None,
                  view_regex: str | None = None, view_from_subfolder: bool = False,
                  split_ratio: float | None = 0.8, split_column: str | None = None,
                  group_regex: str | None = None, seed: int = 0,
                  allow_missing_masks: bool = False, fov_dir: str | Path | None = None,
                  fov_regex: str | None = None) -> Path:
    """Write a manifest for the images under `images_dir` (searched recursively).

    Masks in `masks_dir` pair with images by key: the file stem, or the first capture group of
    `image_regex` / `mask_regex` (files these regexes do not match are ignored). The view comes
    from the image's immediate subfolder, from `view_regex` on its file name, or else from C-arm
    angles in its name (`LAO44_CRA29` -> view `LAO_CRA`, angles 44 and 29) or, for a DICOM
    image, in its header (angles, and view `pipeline.data.dicom.view_label`). `split_column`, when
    given, is written as every row's split (e.g. "test"; "" leaves it empty) instead of a seeded
    split by `split_ratio` (None: no split), grouped by `group_regex`'s first capture if given.
    Field-of-view masks in `fov_dir` fill the `fov` column, paired like masks (by stem or by
    `fov_regex`'s first group); every image must have one.
    """
    images_dir = Path(images_dir).resolve()
    masks_root = Path(masks_dir).resolve() if masks_dir is not None else None
    check_ratio(split_ratio)
    if view_regex is not None and view_from_subfolder:
        raise DatasetImportError("give a view regex or view from subfolder, not both")
    exclude = masks_root if masks_root != images_dir else None  # masks may share the folder
    images = _keyed(_list_images(images_dir, exclude), compile_regex(image_regex, "image regex"))
    if not images:
        raise DatasetImportError(f"{images_dir}: no image files"
                                 + (f" matching {image_regex!r}" if image_regex else ""))
    if view_from_subfolder:
        loose = [str(path) for _, path in images if path.parent == images_dir]
        if loose:
            raise DatasetImportError(list_problems(
                f"{images_dir}: views come from subfolders, but these images sit at the top",
                loose))
    fov_root = Path(fov_dir).resolve() if fov_dir is not None else None
    if fov_root is not None and fov_root != images_dir:  # FOV masks may sit under the images
        images = [(key, path) for key, path in images if not path.is_relative_to(fov_root)]
    pairs = _folder_masks(images, images_dir, masks_root, mask_regex, allow_missing_masks,
                          remedy="a key is the file stem, or the first group of "
                          "--image-regex / --mask-regex: give those when the names differ, or "
                          "--allow-missing-masks to keep these images without a mask")
    fovs = _folder_masks(images, images_dir, fov_root, fov_regex, False,
                         kind="field-of-view mask", remedy="check --fov-regex")
    view = compile_regex(view_regex, "view regex")
    rows = [{"image": path, "mask": pairs.get(path), "fov": fovs.get(path),
             **view_fields(path, images_dir, view, view_from_subfolder)} for _, path in images]
    groups = None if split_column is not None or split_ratio is None else split_groups(
        [path.name for _, path in images], group_regex)
    assign_splits(rows, split_ratio=split_ratio, fixed_split=split_column, groups=groups,
                  seed=seed)
    return write_manifest(out_csv, rows)


def _folder_masks(images: list[tuple[str, Path]], images_dir: Path, masks_dir: Path | None,
                  mask_regex: str | None, allow_missing: bool, *, remedy: str,
                  kind: str = "mask") -> dict[Path, Path]:
    """The mask (or, `kind` "field-of-view mask", FOV) of each image, none without `masks_dir`;
    errors on ambiguous or (unless `allow_missing`) missing ones."""
    if masks_dir is None:
        return {}
    option = "mask regex" if kind == "mask" else "fov regex"
    masks = _keyed(_list_images(masks_dir), compile_regex(mask_regex, option))
    if not masks:
        raise DatasetImportError(f"{masks_dir}: no {kind} files"
                                 + (f" matching {mask_regex!r}" if mask_regex else ""))
    pairs, problems = _pair_masks(images, masks, images_dir, masks_dir)
    if problems:
        raise DatasetImportError(list_problems(f"ambiguous {kind}s", problems))
    missing = [f"{path} (key {key!r})" for key, path in images if path not in pairs]
    if missing and not allow_missing:
        keys = ", ".join(repr(key) for key, _ in masks[:3]) + (", ..." if len(masks) > 3 else "")
        raise DatasetImportError(list_problems(
            f"images without a {kind} in {masks_dir} (its keys: {keys}); {remedy}", missing))
    return pairs
