"""A user's whole session on a dataset laid out like DRIVE, every step a real subprocess.

DRIVE ships `training/images/21_training.tif` (RGB TIFF), `training/1st_manual/21_manual1.gif`
(the vessel annotations, GIF) and `training/mask/21_training_mask.gif` (the field of view, not a
vessel mask). The generated set keeps those names and formats at a small size, with non-square
images (DRIVE's are 565 x 584) and a few 16-bit grayscale TIFFs among the RGB ones.
"""

import csv
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from conftest import REPO, subprocess_env
from PIL import Image
from skimage.draw import line

from pipeline.data.manifest import read_manifest, write_manifest

HEIGHT, WIDTH = 88, 96  # H != W: predictions must come back at each image's own size
NUMBERS = range(21, 33)  # 12 images, 21_training.tif ... 32_training.tif


def _vessels(rng) -> np.ndarray:
    """(H, W) bool: a few random two-pixel-wide lines across the image."""
    mask = np.zeros((HEIGHT, WIDTH), bool)
    for _ in range(3):
        r0, r1 = rng.integers(0, HEIGHT - 1, 2)
        rr, cc = line(int(r0), 0, int(r1), WIDTH - 1)
        mask[rr, cc] = mask[rr + 1, cc] = True
    return mask


def make_drive_like(root):
    """The DRIVE `training/` layout; every fourth image a 16-bit grayscale TIFF."""
    rng = np.random.default_rng(7)
    folders = {name: root / "training" / name for name in ("images", "1st_manual", "mask")}
    for folder in folders.values():
        folder.mkdir(parents=True)
    fov = np.zeros((HEIGHT, WIDTH), np.uint8)
    fov[4:-4, 4:-4] = 255
    for i, number in enumerate(NUMBERS):
        vessels = _vessels(rng)
        if i % 4 == 3:
            gray = rng.integers(20000, 60000, (HEIGHT, WIDTH)).astype(np.uint16)
            gray[vessels] //= 4
            tifffile.imwrite(folders["images"] / f"{number}_training.tif", gray)
        else:
            rgb = rng.integers(60, 230, (HEIGHT, WIDTH, 3)).astype(np.uint8)
            rgb[vessels] //= 3
            tifffile.imwrite(folders["images"] / f"{number}_training.tif", rgb,
                             photometric="rgb")
        Image.fromarray(vessels.astype(np.uint8) * 255).save(
            folders["1st_manual"] / f"{number}_manual1.gif")
        Image.fromarray(fov).save(folders["mask"] / f"{number}_training_mask.gif")
    return root


@pytest.fixture
def spawn():
    """Popen that never outlives the test."""
    started = []

    def start(args, cwd, module=False):
        started.append(subprocess.Popen(_command(args, module), cwd=cwd, env=subprocess_env(),
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True))
        return started[-1]

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.communicate()


def _command(args, module=False):
    return [sys.executable, *(["-m"] if module else []), *map(str, args)]


def _run(args, cwd, module=False):
    return subprocess.run(_command(args, module), cwd=cwd, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)


def _ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def _bad_manifest(folder, drive):
    """Four DRIVE rows, the third naming an image that is not there."""
    rows = [{"image": drive / "images" / f"{n}_training.tif",
             "mask": drive / "1st_manual" / f"{n}_manual1.gif", "split": "train"}
            for n in NUMBERS[:4]]
    rows[2]["image"] = drive / "images" / "99_training.tif"  # a typo in the manifest
    return write_manifest(folder / "bad.csv", rows)


def test_drive_layout_import_check_extract_train_predict(tmp_path, spawn):
    drive = make_drive_like(tmp_path / "DRIVE") / "training"
    # A manifest with a missing file, extracted alongside the session (in a folder of its own):
    # it must stop at the check, name the row and the file, and write no cache.
    elsewhere = tmp_path / "elsewhere"
    bad = spawn([REPO / "extract_features.py", "--data", _bad_manifest(elsewhere, drive),
                 "--backbone", "tiny", "--device", "cpu"], elsewhere)

    out = _ok(_run(["pipeline.data", "import", "folder", "DRIVE/training/images",
                    "--masks", "DRIVE/training/1st_manual", "--image-regex", r"(\d+)_training",
                    "--mask-regex", r"(\d+)_manual1", "--out", "m.csv"], tmp_path, module=True))
    assert "12 rows, 12 with masks" in out
    assert out.splitlines()[-1] == "next: check every row: sam3-vessel data check m.csv"
    samples = read_manifest(tmp_path / "m.csv")
    assert [s.image.name for s in samples] == [f"{n}_training.tif" for n in NUMBERS]
    assert all(s.mask.name == s.image.name.replace("_training.tif", "_manual1.gif")
               and s.mask.parent.name == "1st_manual" for s in samples)
    assert {s.split for s in samples} == {"train", "val"}
    n_val = sum(s.split == "val" for s in samples)

    check = spawn(["pipeline.data", "check", "m.csv"], tmp_path, module=True)
    out = _ok(_run([REPO / "extract_features.py", "--data", "m.csv", "--backbone", "tiny",
                    "--device", "cpu"], tmp_path))
    rows = 12 + 4 * (12 - n_val)  # the default: 4 random copies of each training image
    assert f"extracted {rows} rows in " in out and f"the manifest needs {rows}: 12 images + " \
        f"{rows - 12} augmented copies (4 of each training image" in out
    cache_id = re.search(r"^cache (\S+) at ", out, re.M).group(1)
    assert out.splitlines()[-1] == (f"next: train on it: sam3-vessel train --data m.csv --cache "
                                    f"{cache_id} --device cpu")
    assert (tmp_path / "cache" / f"{cache_id}.zarr" / "zarr.json").is_file()
    check_out, _ = check.communicate(timeout=300)
    assert check.returncode == 0 and "12 rows, 0 errors" in check_out, check_out

    trained = _run([REPO / "train_head.py", "--data", "m.csv", "--backbone", "tiny",
                    "--epochs", "2", "--device", "cpu", "--run-dir", "run",
                    "--loader-workers", "0"], tmp_path)
    out = _ok(trained)
    assert "\x1b[A" not in trained.stderr + out  # no nested bar redrawn into a log file
    assert out.splitlines()[-3:] == [
        "next: predict new images: sam3-vessel predict --run run --data NEW.csv --out "
        "run-predictions",
        "      compare runs:       sam3-vessel runs compare '*'",
        "      export for SAM 3:   sam3-vessel export --run run --out run.pt"]
    run = tmp_path / "run"
    for name in ("config.json", "metrics.jsonl", "best.pt", "last.pt", "report.json",
                 "curves.png", "caches.json", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors"):
        assert (run / name).is_file(), name
    assert len(list((run / "overlays").glob("*.png"))) == min(6, n_val)
    config = json.loads((run / "config.json").read_text())
    assert config["cache"]["id"] == cache_id
    assert config["samples"] == {"train": 12 - n_val, "val": n_val}
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["split"]) for r in records] == [
        (1, "train"), (1, "val"), (2, "train"), (2, "val")]
    assert all(np.isfinite(r["loss"]) for r in records)
    report = json.loads((run / "report.json").read_text())
    assert 0.0 <= report["val"]["dice"] <= 1.0

    out = _ok(_run(["pipeline.predict", "--run", "run", "--data", "m.csv", "--out", "preds"],
                   tmp_path, module=True))
    assert "12 masks in preds (12 from cached features, 0 through the backbone)" in out
    assert out.splitlines()[-1] == ("next: look at preds/overlays/; export the model for SAM 3: "
                                    "sam3-vessel export --run run --out run.pt")
    with (tmp_path / "preds" / "predictions.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["row"]) for r in rows] == list(range(1, 13))
    assert {r["features"] for r in rows} == {"cached"}
    for row, sample in zip(rows, samples, strict=True):
        assert row["image"] == str(sample.image)
        with Image.open(tmp_path / row["mask"]) as mask:
            assert mask.size == (WIDTH, HEIGHT) and mask.mode == "L"
            assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 255}

    out, err = bad.communicate(timeout=300)
    assert bad.returncode == 1, out + err
    assert f"row 3: {drive / 'images' / '99_training.tif'}: file not found" in err
    assert "4 rows, 1 errors" in err and "extracted" not in out
    assert not (elsewhere / "cache").exists()


def test_lzw_fundus_tiffs_pass_check_extract_and_train(tmp_path):
    """The most used public retinal set ships 40 LZW-compressed 565 x 584 RGB TIFFs: the same
    count, size and compression go through import, check, extraction and training."""
    from pipeline.config import ExtractConfig, TrainConfig
    from pipeline.data.checks import check_manifest
    from pipeline.data.importers import import_folder
    from pipeline.data.manifest import sample_keys
    from pipeline.extraction import run_extraction
    from pipeline.train.launch import train

    rng = np.random.default_rng(5)
    images, manual = tmp_path / "images", tmp_path / "1st_manual"
    images.mkdir()
    manual.mkdir()
    for number in range(1, 41):
        vessels = np.zeros((584, 565), bool)
        for _ in range(4):
            rr, cc = line(int(rng.integers(0, 583)), 0, int(rng.integers(0, 583)), 564)
            vessels[rr, cc] = True
        rgb = rng.integers(60, 230, (584, 565, 3)).astype(np.uint8)
        rgb[vessels] //= 3
        tifffile.imwrite(images / f"{number:02d}_training.tif", rgb, photometric="rgb",
                         compression="lzw")
        Image.fromarray(vessels.astype(np.uint8) * 255).save(manual / f"{number:02d}_manual1.gif")
    with tifffile.TiffFile(images / "01_training.tif") as tiff:
        assert tiff.pages[0].compression.name == "LZW"
    manifest = import_folder(images, tmp_path / "m.csv", masks_dir=manual,
                             image_regex=r"(\d+)_training", mask_regex=r"(\d+)_manual1")
    samples = read_manifest(manifest)
    report = check_manifest(samples, require_masks=True)
    assert report.ok and len(report.keys) == 40, report.format()
    cache = tmp_path / "cache"
    extract = ExtractConfig(data=str(manifest), backbone="tiny", cache_dir=str(cache),
                            batch_size=8, loader_workers=0)
    run_extraction(extract, samples, sample_keys(samples))
    run = train(TrainConfig(data=str(manifest), backbone="tiny", cache_dir=str(cache),
                            run_dir=str(tmp_path / "run"), epochs=1, batch_size=8,
                            e2e_every=0, loader_workers=0, overlays=1))
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["split"] for r in records] == ["train", "val"]
    assert all(np.isfinite(r["loss"]) for r in records)
