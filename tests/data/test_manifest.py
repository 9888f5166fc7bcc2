"""Manifest parsing: nothing a spreadsheet writes is silently dropped or misread."""

import csv

import pytest
from conftest import make_dataset

from pipeline.data.checks import check_manifest
from pipeline.data.manifest import KNOWN_COLUMNS, ManifestError, read_manifest
from pipeline.data.samples import split_samples


def _rows(tmp_path, n=12):
    manifest = make_dataset(tmp_path / "d", n, size=16)
    with manifest.open(newline="") as handle:
        return manifest, list(csv.DictReader(handle))


def _write(path, header, rows, encoding="utf-8"):
    lines = [",".join(header)] + [",".join(str(r.get(h, "")) for h in header) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding=encoding)
    return path


def test_split_spellings_are_normalised_and_test_rows_held_out(tmp_path, capsys):
    manifest, rows = _rows(tmp_path)
    spellings = ["Train", "TRAIN", "validation", "test", "Val", '"train "', "valid", "training",
                 "train", "val", "", "Validation"]
    for row, split in zip(rows, spellings, strict=True):
        row["split"] = split
    _write(manifest, ["image", "mask", "view", "split"], rows)
    samples = read_manifest(manifest)
    assert [s.split for s in samples] == ["train", "train", "val", "test", "val", "train", "val",
                                          "train", "train", "val", None, "val"]
    train, val = split_samples(samples)
    assert len(train) + len(val) == 11 and len(val) == 5  # today: 5 of 12 rows used
    assert "1 `test` row(s) held out" in capsys.readouterr().out
    assert check_manifest(samples, require_masks=True).ok


def test_a_split_outside_the_accepted_set_names_its_row(tmp_path):
    manifest, rows = _rows(tmp_path, 4)
    rows[2]["split"] = "holdout"
    _write(manifest, ["image", "mask", "view", "split"], rows)
    with pytest.raises(ManifestError, match=r"row 3 has split 'holdout'; use one of .*train"):
        read_manifest(manifest)


@pytest.mark.parametrize(("column", "hint"), [("Split", "split"), ("veiw", "view"),
                                              ("masks", "mask"), ("IMAGE", "image")])
def test_a_near_miss_header_is_an_error_naming_the_column(tmp_path, column, hint):
    manifest, rows = _rows(tmp_path, 4)
    header = ["image", "mask", "view", "split"]
    header[header.index(hint)] = column
    for row in rows:
        row[column] = row.pop(hint)
    _write(manifest, header, rows)
    with pytest.raises(ManifestError) as info:
        read_manifest(manifest)
    assert f"unknown column '{column}' (did you mean '{hint}'?)" in str(info.value)
    assert str(manifest) in str(info.value)


def test_every_known_column_is_accepted(tmp_path):
    manifest, rows = _rows(tmp_path, 4)
    for row in rows:
        row.update(primary_angle="30", secondary_angle="-10", fov="")
    _write(manifest, list(KNOWN_COLUMNS), rows)
    assert [s.angles for s in read_manifest(manifest)] == [(30.0, -10.0)] * 4


def test_a_byte_order_mark_and_utf16_are_read(tmp_path):
    manifest, rows = _rows(tmp_path, 4)
    header = ["image", "mask", "view", "split"]
    expected = [(s.image, s.split) for s in read_manifest(manifest)]
    for encoding in ("utf-8-sig", "utf-16"):
        _write(manifest, header, rows, encoding=encoding)
        assert [(s.image, s.split) for s in read_manifest(manifest)] == expected, encoding


def test_latin1_is_an_error_naming_the_file_and_line(tmp_path):
    manifest, rows = _rows(tmp_path, 4)
    rows[1]["view"] = "caudal é"
    _write(manifest, ["image", "mask", "view", "split"], rows, encoding="latin-1")
    with pytest.raises(ManifestError, match=rf"{manifest}: not UTF-8 text \(byte 0xe9 on line 3\)"):
        read_manifest(manifest)


def test_an_empty_validation_set_is_an_error_unless_allowed(tmp_path):
    manifest, rows = _rows(tmp_path, 4)
    for row in rows:
        row["split"] = "train"
    _write(manifest, ["image", "mask", "view", "split"], rows)
    samples = read_manifest(manifest)
    with pytest.raises(ManifestError, match="no validation rows.*--allow-empty-val"):
        split_samples(samples)
    assert len(split_samples(samples, allow_empty_val=True)[0]) == 4


@pytest.mark.parametrize(("primary", "secondary", "message"), [
    ("nan", "0", "primary angle nan is not a finite number of degrees"),
    ("200", "0", "primary angle 200 is outside -180..180 degrees"),
    ("-179", "95", "secondary angle 95 is outside -90..90 degrees"),
])
def test_angles_are_checked_for_range(tmp_path, primary, secondary, message):
    manifest, rows = _rows(tmp_path, 4)
    rows[1].update(primary_angle=primary, secondary_angle=secondary)
    _write(manifest, ["image", "mask", "view", "split", "primary_angle", "secondary_angle"], rows)
    with pytest.raises(ManifestError) as raised:
        read_manifest(manifest)
    assert str(raised.value) == f"{manifest}: row 2: {message}"


def test_minus_180_is_the_projection_of_180(tmp_path):
    manifest, rows = _rows(tmp_path, 4)
    rows[0].update(primary_angle="-180", secondary_angle="0")
    rows[1].update(primary_angle="180", secondary_angle="-90")
    _write(manifest, ["image", "mask", "view", "split", "primary_angle", "secondary_angle"], rows)
    assert [s.angles for s in read_manifest(manifest)[:2]] == [(180.0, 0.0), (180.0, -90.0)]
