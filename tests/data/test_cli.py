"""The `python -m pipeline.data` CLI: exit codes, and messages that name the file."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.cli import main
from pipeline.data.manifest import read_manifest


def _png(path: Path, value: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.full((8, 10), value, dtype=np.uint8)
    array[2:5, 2:7] = 255 - value
    Image.fromarray(array).save(path)
    return path


@pytest.fixture
def dataset(tmp_path) -> Path:
    for index in range(4):
        _png(tmp_path / "images" / f"{index}_LAO30_CRA10.png", index)
        _png(tmp_path / "masks" / f"{index}_LAO30_CRA10.png", 0)
    return tmp_path


def test_import_folder_then_check_ok(dataset, capsys):
    out = dataset / "manifest.csv"
    assert main(["import", "folder", str(dataset / "images"), "--out", str(out),
                 "--masks", str(dataset / "masks"), "--split-ratio", "0.5", "--seed", "1"]) == 0
    assert "wrote" in capsys.readouterr().out
    samples = read_manifest(out)
    assert len(samples) == 4 and {s.split for s in samples} == {"train", "val"}
    assert all(s.view == "LAO_CRA" and s.angles == (30.0, 10.0) for s in samples)
    assert main(["check", str(out)]) == 0
    assert "0 errors" in capsys.readouterr().out


def test_import_folder_with_fields_of_view(dataset, capsys):
    for index in range(4):
        _png(dataset / "fov" / f"fov_{index}.png", 255)
    out = dataset / "manifest.csv"
    assert main(["import", "folder", str(dataset / "images"), "--out", str(out),
                 "--masks", str(dataset / "masks"), "--fov", str(dataset / "fov"),
                 "--image-regex", r"^(\d+)_", "--mask-regex", r"^(\d+)_",
                 "--fov-regex", r"fov_(\d+)"]) == 0
    assert "4 with masks, 4 with a field of view" in capsys.readouterr().out
    assert [s.fov.name for s in read_manifest(out)] == [f"fov_{i}.png" for i in range(4)]
    assert main(["check", str(out)]) == 0


def test_check_errors_exit_1_and_name_the_file(dataset, capsys):
    out = dataset / "manifest.csv"
    main(["import", "folder", str(dataset / "images"), "--out", str(out),
          "--masks", str(dataset / "masks")])
    (dataset / "masks" / "2_LAO30_CRA10.png").write_bytes(b"not a png")
    capsys.readouterr()
    assert main(["check", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "row 3: " in printed and "2_LAO30_CRA10.png" in printed
    assert main(["check", str(out), "--no-masks"]) == 1  # a broken mask is still an error


def test_failures_are_one_clean_line(dataset, capsys):
    assert main(["check", str(dataset / "nope.csv")]) == 1
    err = capsys.readouterr().err
    assert "nope.csv" in err and "Traceback" not in err and err.count("\n") == 1
    (dataset / "masks" / "1_LAO30_CRA10.png").unlink()
    assert main(["import", "folder", str(dataset / "images"), "--out",
                 str(dataset / "m.csv"), "--masks", str(dataset / "masks")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "1_LAO30_CRA10.png" in err and "Traceback" not in err


def test_import_coco(tmp_path, capsys):
    _png(tmp_path / "images" / "1.png", 0)
    coco = {"images": [{"id": 1, "file_name": "1.png", "height": 8, "width": 10}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "iscrowd": 0,
                             "segmentation": [[1, 1, 6, 1, 6, 5, 1, 5]]}],
            "categories": [{"id": 3, "name": "vessel"}]}
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    out = tmp_path / "manifest.csv"
    assert main(["import", "coco", str(tmp_path / "ann.json"), "--images",
                 str(tmp_path / "images"), "--out", str(out), "--masks-out",
                 str(tmp_path / "masks"), "--categories", "vessel"]) == 0
    mask = np.asarray(Image.open(read_manifest(out)[0].mask))
    assert mask.max() == 255 and mask[3, 3] == 255 and mask[7, 9] == 0
    assert main(["check", str(out)]) == 0


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
def test_module_entry_point_exit_code(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["pipeline.data", "check", str(tmp_path / "none.csv")])
    with pytest.raises(SystemExit) as caught:
        runpy.run_module("pipeline.data", run_name="__main__")
    assert caught.value.code == 1
    assert "none.csv: manifest not found" in capsys.readouterr().err


def test_import_append_adds_a_second_folder_with_its_own_split(dataset, capsys):
    for index in range(2):
        _png(dataset / "test" / "images" / f"t{index}.png", 40 + index)
        _png(dataset / "test" / "masks" / f"t{index}_manual.png", 0)
    out = dataset / "manifest.csv"
    assert main(["import", "folder", str(dataset / "images"), "--out", str(out),
                 "--masks", str(dataset / "masks"), "--split", "train"]) == 0
    assert main(["import", "folder", str(dataset / "test" / "images"), "--out", str(out),
                 "--masks", str(dataset / "test" / "masks"), "--mask-regex", "(.*)_manual",
                 "--split", "val", "--append"]) == 0
    assert "6 rows, 6 with masks; splits {'train': 4, 'val': 2}" in capsys.readouterr().out
    samples = read_manifest(out)
    assert [s.split for s in samples] == ["train"] * 4 + ["val"] * 2
    assert samples[4].image == dataset / "test" / "images" / "t0.png"
    assert samples[4].mask == dataset / "test" / "masks" / "t0_manual.png"
    assert samples[0].angles == (30.0, 10.0) and samples[4].angles is None
    assert sorted(p.name for p in dataset.iterdir() if p.suffix == ".csv") == ["manifest.csv"]
    assert main(["check", str(out)]) == 0


def test_import_dicom_then_check(tmp_path, capsys):
    from dicom_files import write_xa

    rng = np.random.default_rng(0)
    runs = (("a", "P1", (30, 20)), ("b", "P2", None), ("c", "P2", (-30, 0)))
    for name, patient, angles in runs:
        write_xa(tmp_path / "runs" / f"{name}.dcm",
                 rng.integers(0, 4096, (3, 8, 10)).astype(np.uint16), bits_stored=12,
                 patient=patient, angles=angles)
        for frame in (1, 3):
            _png(tmp_path / "masks" / f"{name}_{frame}.png", 0)
    out = tmp_path / "angio.csv"
    assert main(["import", "dicom", str(tmp_path / "runs"), "--masks", str(tmp_path / "masks"),
                 "--frames-out", str(tmp_path / "frames"), "--out", str(out),
                 "--split-ratio", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert f"note: {tmp_path / 'runs' / 'b.dcm'}: no Positioner Primary/Secondary" in printed
    assert "6 rows, 6 with masks" in printed and "'LAO30_CRA20': 2" in printed
    samples = read_manifest(out)
    assert {s.split for s in samples if s.source.name != "a.dcm"} != {
        s.split for s in samples if s.source.name == "a.dcm"}  # P2's runs together, apart
    assert main(["check", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "0 errors" in printed and printed.count("no C-arm angles") == 1
    assert f"{tmp_path / 'runs' / 'b.dcm'}: no C-arm angles" in printed
    write_xa(tmp_path / "runs" / "c.dcm", np.zeros((2, 8, 10), np.uint16), bits_stored=12)
    assert main(["check", str(out)]) == 1
    assert "c.dcm: frame 3 is past the last frame" in capsys.readouterr().out
    (tmp_path / "masks" / "c_3.png").unlink()
    _png(tmp_path / "masks" / "c_3.png", 0).rename(tmp_path / "masks" / "c_9.png")
    assert main(["import", "dicom", str(tmp_path / "runs"), "--masks", str(tmp_path / "masks"),
                 "--frames-out", str(tmp_path / "frames"), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: DICOM problems (nothing was written) (1)")
    assert "c_9.png: frame 9 is past the last frame" in err and "Traceback" not in err
