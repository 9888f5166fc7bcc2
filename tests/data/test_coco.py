"""The COCO importer: masks rendered as pycocotools renders them, errors naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from pipeline.data.coco import import_coco
from pipeline.data.importers import DatasetImportError
from pipeline.data.manifest import read_manifest


def _png(path: Path, value: int = 0, size: tuple[int, int] = (12, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.full(size, value, dtype=np.uint8)
    array[2:5, 3:9] = 255 - value
    Image.fromarray(array).save(path)
    return path


def _coco_file(tmp_path: Path) -> Path:
    """Two images: a polygon on the first; compressed and uncompressed RLEs on the second."""
    height, width = 24, 32
    for name in ("1.png", "2.png"):
        _png(tmp_path / "images" / name, size=(height, width))
    region = np.zeros((height, width), dtype=np.uint8)
    region[5:15, 20:28] = 1
    compressed = mask_utils.encode(np.asfortranarray(region))
    compressed["counts"] = compressed["counts"].decode()
    flat, counts, current, run = region.flatten(order="F"), [], 0, 0
    for value in flat:
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    shifted = {"size": [height, width],  # uncompressed, two columns to the right
               "counts": [counts[0] + 2 * height, *counts[1:-1], counts[-1] - 2 * height]}
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
         "segmentation": [[2, 2, 12, 2, 12, 10, 2, 10]], "area": 80, "bbox": [2, 2, 10, 8]},
        {"id": 2, "image_id": 2, "category_id": 2, "iscrowd": 1,
         "segmentation": compressed, "area": 80, "bbox": [20, 5, 8, 10]},
        {"id": 3, "image_id": 2, "category_id": 1, "iscrowd": 1,
         "segmentation": shifted, "area": 80, "bbox": [22, 5, 8, 10]},
    ]
    coco = {"images": [{"id": i, "file_name": f"{i}.png", "height": height, "width": width}
                       for i in (1, 2)],
            "annotations": anns,
            "categories": [{"id": 1, "name": "vessel"}, {"id": 2, "name": "stenosis"}]}
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(coco))
    return path


def _pycocotools_union(annotation_json: Path, image_id: int, category_ids=None) -> np.ndarray:
    coco = COCO(str(annotation_json))
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id], catIds=category_ids or []))
    union = np.zeros((24, 32), dtype=bool)
    for ann in anns:
        union |= coco.annToMask(ann).astype(bool)
    return union


def test_coco_masks_equal_pycocotools(tmp_path):
    annotations = _coco_file(tmp_path)
    out = import_coco(annotations, tmp_path / "images", tmp_path / "m.csv",
                      masks_out_dir=tmp_path / "masks")
    samples = read_manifest(out)
    assert [s.mask.name for s in samples] == ["1.png", "2.png"]
    for image_id, sample in enumerate(samples, start=1):
        written = np.asarray(Image.open(sample.mask))
        assert set(np.unique(written)) <= {0, 255}
        expected = _pycocotools_union(annotations, image_id)
        assert expected.any()
        np.testing.assert_array_equal(written == 255, expected)
    out = import_coco(annotations, tmp_path / "images", tmp_path / "v.csv",
                      masks_out_dir=tmp_path / "vessel", categories=["vessel"])
    second = np.asarray(Image.open(read_manifest(out)[1].mask)) == 255
    np.testing.assert_array_equal(second, _pycocotools_union(annotations, 2, [1]))


def test_coco_errors_name_the_file(tmp_path):
    annotations = _coco_file(tmp_path)
    with pytest.raises(DatasetImportError, match="unknown categories.*'artery'"):
        import_coco(annotations, tmp_path / "images", tmp_path / "m.csv",
                    masks_out_dir=tmp_path / "masks", categories=["artery"])
    (tmp_path / "images" / "2.png").unlink()
    with pytest.raises(DatasetImportError, match=r"annotations\.json: image files not found"):
        import_coco(annotations, tmp_path / "images", tmp_path / "m.csv",
                    masks_out_dir=tmp_path / "masks")
