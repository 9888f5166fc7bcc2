"""The COCO importer: an annotation file (e.g. ARCADE) -> one binary vessel mask per image and
a manifest CSV. Polygons and RLEs of the chosen categories are rendered as
`pycocotools.coco.COCO.annToMask` renders them and merged into one vessel class; views, angles
and splits as `pipeline.data.importers.import_folder` gives them.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.importers import (
    DatasetImportError,
    check_ratio,
    compile_regex,
    list_problems,
    split_groups,
    view_fields,
)
from pipeline.data.manifest import write_manifest
from pipeline.data.splits import assign_splits


def import_coco(annotation_json: str | Path, images_dir: str | Path, out_csv: str | Path, *,
                masks_out_dir: str | Path, categories: list[str] | None = None,
                view_regex: str | None = None, split_ratio: float | None = 0.8,
                group_regex: str | None = None, seed: int = 0) -> Path:
    """Write a manifest for a COCO annotation file, rendering one binary mask per image.

    Polygons and RLEs (compressed or not) of the selected categories (all by default, else those
    named) are merged into one vessel class and written as PNG 0/255 to `masks_out_dir`, at the
    image's path relative to `images_dir` with a `.png` suffix. Images without annotations get
    an empty mask. Views, angles and splits as in `import_folder`.
    """
    annotation_json, images_dir = Path(annotation_json), Path(images_dir).resolve()
    masks_out_dir = Path(masks_out_dir).resolve()
    check_ratio(split_ratio)
    coco = _load_coco(annotation_json)
    wanted = _category_ids(annotation_json, coco, categories)
    by_image: dict[int, list[dict]] = defaultdict(list)
    for ann in coco["annotations"]:
        if ann.get("category_id") in wanted:
            by_image[ann.get("image_id")].append(ann)
    entries = sorted(coco["images"], key=lambda e: str(e.get("file_name")))
    missing = [str(images_dir / e["file_name"]) for e in entries
               if not (images_dir / e["file_name"]).is_file()]
    if missing:
        raise DatasetImportError(list_problems(f"{annotation_json}: image files not found",
                                                missing))
    view, rows = compile_regex(view_regex, "view regex"), []
    for entry in entries:
        image = images_dir / entry["file_name"]
        mask_path = masks_out_dir / Path(entry["file_name"]).with_suffix(".png")
        mask = render_mask(by_image.get(entry["id"], []), int(entry["height"]),
                           int(entry["width"]), source=f"{annotation_json}: {entry['file_name']}")
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
        rows.append({"image": image, "mask": mask_path,
                     **view_fields(image, images_dir, view, False)})
    groups = None if split_ratio is None else split_groups(
        [Path(e["file_name"]).name for e in entries], group_regex)
    assign_splits(rows, split_ratio=split_ratio, fixed_split=None, groups=groups, seed=seed)
    return write_manifest(out_csv, rows)


def _load_coco(path: Path) -> dict:
    """The parsed COCO file, with `images`, `annotations` and `categories` checked present."""
    if not path.is_file():
        raise DatasetImportError(f"{path}: annotation file not found")
    try:
        coco = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetImportError(f"{path}: not a readable JSON file ({err})") from err
    if not isinstance(coco, dict):
        raise DatasetImportError(f"{path}: not a COCO annotation file (top level is not an object)")
    absent = [key for key in ("images", "annotations", "categories") if key not in coco]
    if absent:
        raise DatasetImportError(f"{path}: not a COCO annotation file (no {', '.join(absent)})")
    for entry in coco["images"]:
        if not all(k in entry for k in ("id", "file_name", "height", "width")):
            raise DatasetImportError(
                f"{path}: image entry {entry} lacks one of id, file_name, height, width")
    return coco


def _category_ids(path: Path, coco: dict, names: list[str] | None) -> set:
    """Ids of the categories named (all categories when `names` is None)."""
    known = {c["name"]: c["id"] for c in coco["categories"]}
    if names is None:
        return set(known.values())
    unknown = [name for name in names if name not in known]
    if unknown:
        raise DatasetImportError(
            f"{path}: unknown categories {unknown} (known: {sorted(known)})")
    return {known[name] for name in names}


def render_mask(annotations: list[dict], height: int, width: int, source: str = "") -> np.ndarray:
    """The union of the annotations' segmentations as an (H, W) bool mask.

    Same rendering as `pycocotools.coco.COCO.annToMask`: polygons merged with `frPyObjects`,
    uncompressed RLE converted with `frPyObjects`, compressed RLE decoded as is.
    """
    from pycocotools import mask as mask_utils

    union = np.zeros((height, width), dtype=bool)
    for ann in annotations:
        segm = ann.get("segmentation")
        try:
            if isinstance(segm, list):
                if not segm:
                    continue
                rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
            elif isinstance(segm, dict) and isinstance(segm.get("counts"), list):
                rle = mask_utils.frPyObjects(segm, height, width)
            elif isinstance(segm, dict):
                rle = segm
            else:
                raise TypeError(f"unsupported segmentation type {type(segm).__name__}")
            decoded = mask_utils.decode(rle)
        except (TypeError, ValueError, KeyError, IndexError) as err:
            raise DatasetImportError(
                f"{source}: annotation {ann.get('id')} cannot be rendered ({err})") from err
        if decoded.shape[:2] != (height, width):
            raise DatasetImportError(f"{source}: annotation {ann.get('id')} is "
                                     f"{decoded.shape[:2]}, the image entry {(height, width)}")
        union |= decoded.astype(bool).reshape(height, width)
    return union
