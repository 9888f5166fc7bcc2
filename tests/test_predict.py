import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_dataset, run_records
from PIL import Image

from pipeline.cli import predict_main
from pipeline.config import TrainConfig
from pipeline.data.images import read_mask
from pipeline.data.manifest import read_manifest, write_manifest
from pipeline.train.launch import train
from pipeline.train.metrics import SCORES


def _rows(out):
    with (out / "predictions.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_new_images_go_through_the_backbone_and_masks_keep_their_size(dataset, tmp_path,
                                                                      monkeypatch):
    run = train(TrainConfig(data=str(dataset), backbone="tiny", cache_dir=str(tmp_path / "c"),
                            run_dir=str(tmp_path / "run"), epochs=1, batch_size=4, e2e_every=0,
                            extract_missing=True, loader_workers=0, overlays=0, device="cpu"))
    fresh = make_dataset(tmp_path / "new", 2, seed=7, size=80, start=50)
    out = tmp_path / "pred"
    monkeypatch.chdir(tmp_path)
    assert predict_main(["--run", str(run), "--data", str(fresh), "--out", "pred",
                         "--device", "cpu"]) == 0
    rows = _rows(out)
    assert [r["features"] for r in rows] == ["live", "live"]
    # Absolute, as the images are: the CSV reads the same from any folder.
    assert [Path(r["mask"]).parent for r in rows] == [out, out]
    for row in rows:
        mask = np.asarray(Image.open(row["mask"]))
        assert mask.shape == (80, 80) and set(np.unique(mask)) <= {0, 255}
    assert predict_main(["--run", str(run), "--data", str(dataset), "--out",
                         str(tmp_path / "again"), "--device", "cpu"]) == 0
    assert {r["features"] for r in _rows(tmp_path / "again")} == {"cached"}
    # Loader worker processes change nothing in the masks.
    assert predict_main(["--run", str(run), "--data", str(dataset), "--out",
                         str(tmp_path / "inline"), "--device", "cpu",
                         "--loader-workers", "0"]) == 0
    for a, b in zip(_rows(tmp_path / "again"), _rows(tmp_path / "inline"), strict=True):
        assert Path(a["mask"]).read_bytes() == Path(b["mask"]).read_bytes()
    # `demo` names the synthetic set, made in the run's cache folder (today: "not found").
    assert predict_main(["--run", str(run), "--data", "demo", "--out", str(tmp_path / "demo"),
                         "--device", "cpu", "--loader-workers", "0"]) == 0
    assert len(_rows(tmp_path / "demo")) == 96


def test_after_end_to_end_epochs_the_stale_cache_is_not_used(dataset, tmp_path):
    run = train(TrainConfig(data=str(dataset), backbone="tiny", cache_dir=str(tmp_path / "c"),
                            run_dir=str(tmp_path / "run"), epochs=1, batch_size=4, e2e_every=1,
                            extract_missing=True, loader_workers=0, overlays=0, device="cpu",
                            lr=1e-2))
    out = tmp_path / "pred"
    assert predict_main(["--run", str(run), "--data", str(dataset), "--out", str(out),
                         "--device", "cpu"]) == 0
    assert {r["features"] for r in _rows(out)} == {"live"}


def _non_square_dataset(folder: Path, n: int = 8, shape=(70, 90), with_masks=True) -> Path:
    """n gray images of `shape` (H, W), not the tiny backbone's 252 x 252, with vessel masks
    and elliptical fields of view; every other image is a val row."""
    rng = np.random.default_rng(3)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    fov = ((yy / shape[0] - 0.5) / 0.45) ** 2 + ((xx / shape[1] - 0.5) / 0.45) ** 2 < 1
    rows = []
    for i in range(n):
        mask = np.zeros(shape, bool)
        mask[:, 20 + 3 * i: 23 + 3 * i] = True
        mask[np.abs(yy - xx * shape[0] / shape[1] - i) < 1.5] = True
        image = rng.integers(100, 255, shape).astype(np.uint8)
        image[mask] //= 3
        for name, array in (("img", image), ("mask", mask * 255), ("fov", fov * 255)):
            Image.fromarray(array.astype(np.uint8)).save(folder / f"{name}{i}.png")
        rows.append({"image": folder / f"img{i}.png", "view": "AP" if i % 4 < 2 else "LAO",
                     "mask": folder / f"mask{i}.png" if with_masks else None,
                     "fov": folder / f"fov{i}.png", "split": "val" if i % 2 else "train"})
    return write_manifest(folder / "manifest.csv", rows)


def _by_hand(pred: np.ndarray, mask: np.ndarray, fov: np.ndarray) -> dict:
    tp, fp = (pred & mask & fov).sum(), (pred & ~mask & fov).sum()
    fn, tn = (~pred & mask & fov).sum(), (~pred & ~mask & fov).sum()
    return {"dice": 2 * tp / (2 * tp + fp + fn), "sensitivity": tp / (tp + fn),
            "specificity": tn / (tn + fp), "accuracy": (tp + tn) / fov.sum()}


def test_validation_and_predict_score_each_image_at_its_own_size(tmp_path, capsys):
    data = _non_square_dataset(tmp_path / "data")
    run = train(TrainConfig(data=str(data), backbone="tiny", cache_dir=str(tmp_path / "c"),
                            run_dir=str(tmp_path / "run"), epochs=2, batch_size=4, e2e_every=0,
                            extract_missing=True, loader_workers=0, overlays=2, device="cpu",
                            lr=1e-2))
    assert len(list((run / "overlays").glob("*.png"))) == 2
    printed = capsys.readouterr().out
    assert "validation scores of the best step" in printed
    assert all(f" {name} " in printed for name in SCORES)
    report = json.loads((run / "report.json").read_text())
    assert report["scoring"]["fov"] == "4 of 4 images scored inside their field of view"
    out = tmp_path / "pred"
    assert predict_main(["--run", str(run), "--data", str(data), "--out", str(out),
                         "--device", "cpu"]) == 0
    rows = _rows(out)
    assert {r["features"] for r in rows} == {"cached"}  # the logits validation scored
    hand = []
    for sample, row in zip(read_manifest(data), rows, strict=True):
        pred = np.asarray(Image.open(row["mask"])) > 0  # resized back to 70 x 90
        assert pred.shape == (70, 90)
        hand.append(_by_hand(pred, read_mask(sample.mask)[0], read_mask(sample.fov)[0]))
        assert float(row["dice"]) == pytest.approx(hand[-1]["dice"], abs=1e-6)
    val = [h for h, s in zip(hand, read_manifest(data), strict=True) if s.split == "val"]
    for name in ("dice", "sensitivity", "specificity", "accuracy"):
        assert report["val"][name] == pytest.approx(np.mean([h[name] for h in val]))
    assert 0.0 <= report["val"]["auc"] <= 1.0
    predicted = json.loads((out / "report.json").read_text())["predict"]
    assert predicted["n"] == 8 and set(predicted["per_view"]) == {"AP", "LAO"}
    assert predicted["dice"] == pytest.approx(np.mean([h["dice"] for h in hand]))
    assert len(list((out / "overlays").glob("*.png"))) == 6
    # Without masks: masks and overlays, no scores and no report.
    bare = _non_square_dataset(tmp_path / "bare", n=2, with_masks=False)
    assert predict_main(["--run", str(run), "--data", str(bare), "--out", str(tmp_path / "b"),
                         "--device", "cpu", "--overlays", "1"]) == 0
    assert not (tmp_path / "b" / "report.json").exists()
    assert len(list((tmp_path / "b" / "overlays").glob("*.png"))) == 1
    assert all(r["dice"] == "" for r in _rows(tmp_path / "b"))


def test_the_report_scores_the_best_step_mirrored_and_periodic_validations_do_not(tmp_path):
    """With --mirror-tta, report.json holds the best checkpoint scored with mirroring (what
    `predict` of the run gives on the validation rows), metrics.jsonl the unmirrored scores
    that chose it (what `predict` gives with mirroring off)."""
    data = _non_square_dataset(tmp_path / "data")
    run = train(TrainConfig(data=str(data), backbone="tiny", cache_dir=str(tmp_path / "c"),
                            run_dir=str(tmp_path / "run"), epochs=2, batch_size=4, e2e_every=0,
                            extract_missing=True, loader_workers=0, overlays=1, device="cpu",
                            lr=1e-2, mirror_tta=True))
    report = json.loads((run / "report.json").read_text())
    val = report["val"]
    [best_row] = [r for r in run_records(run) if r["split"] == "val" and r["step"] == val["step"]]
    assert val["mirror_tta"] is True and report["scoring"]["inference"].startswith("mirror TTA")
    assert val["unmirrored"]["auc"] == best_row["auc"] and val["n"] == 4

    def predicted(mirror: bool, name: str) -> dict:
        recorded = json.loads((run / "config.json").read_text())
        recorded["config"]["mirror_tta"] = mirror
        (run / "config.json").write_text(json.dumps(recorded))
        assert predict_main(["--run", str(run), "--data", str(data), "--out",
                             str(tmp_path / name), "--device", "cpu"]) == 0
        return json.loads((tmp_path / name / "report.json").read_text())

    mirrored, plain = predicted(True, "mirrored"), predicted(False, "plain")
    for name in ("dice", "auc", "cldice"):
        assert mirrored["by_split"]["val"][name] == pytest.approx(val[name], abs=1e-6)
        assert plain["by_split"]["val"][name] == pytest.approx(best_row[name], abs=1e-6)
    assert val["auc"] != pytest.approx(best_row["auc"], abs=1e-9)  # mirroring did change it
    assert mirrored["scoring"]["inference"].startswith("mirror TTA")
    assert plain["scoring"]["inference"] == "one pass, unmirrored"


def test_predict_owns_its_folder_and_scores_each_split_of_the_run_apart(dataset, tmp_path,
                                                                        capsys):
    run = train(TrainConfig(data=str(dataset), backbone="tiny", cache_dir=str(tmp_path / "c"),
                            run_dir=str(tmp_path / "run"), epochs=1, batch_size=4, e2e_every=0,
                            extract_missing=True, loader_workers=0, overlays=0, device="cpu"))
    out = tmp_path / "pred"
    fresh = make_dataset(tmp_path / "new", 2, seed=7, size=80, start=50)
    assert predict_main(["--run", str(run), "--data", str(fresh), "--out", str(out),
                         "--device", "cpu", "--loader-workers", "0"]) == 0
    assert [r["split"] for r in _rows(out)] == ["new", "new"]  # images the run never saw
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert predict_main(["--run", str(run), "--data", str(dataset), "--out", str(out),
                         "--device", "cpu", "--loader-workers", "0"]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: {out} already holds a prediction (predictions.csv, report.json, overlays, ...); "
        "pass --overwrite to replace it, or choose another --out")
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert predict_main(["--run", str(run), "--data", str(dataset), "--out", str(out),
                         "--device", "cpu", "--loader-workers", "0", "--overwrite"]) == 0
    samples = read_manifest(dataset)
    rows = _rows(out)
    assert [r["split"] for r in rows] == [s.split for s in samples]  # the run's train and val
    assert sorted(p.name for p in out.glob("*_mask.png")) == [
        f"{s.row:05d}_{s.image.stem}_mask.png" for s in samples]  # the old masks are gone
    assert (out / "notes.txt").read_text() == "mine"
    report = json.loads((out / "report.json").read_text())
    counts = {split: sum(s.split == split for s in samples) for split in ("train", "val")}
    assert {k: v["n"] for k, v in report["by_split"].items()} == counts
    for split in ("train", "val"):
        assert report["by_split"][split]["dice"] == pytest.approx(np.mean(
            [float(r["dice"]) for r in rows if r["split"] == split]))
    printed = capsys.readouterr().out
    assert (f"scores of {counts['train']} train rows with masks (images the run trained on: "
            "not held-out scores)") in printed
    assert f"scores of {counts['val']} val rows with masks (each image" in printed
    # A training run's directory is never a prediction folder, --overwrite or not: its
    # report.json and overlays stay the run's.
    kept = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for extra in ([], ["--overwrite"]):
        assert predict_main(["--run", str(run), "--data", str(dataset), "--out", str(run),
                             "--device", "cpu", "--loader-workers", "0", *extra]) == 1
        assert capsys.readouterr().err.strip() == (
            f"error: {run} is a training run's directory (config.json, metrics.jsonl, best.pt, "
            "last.pt): predict would replace its report.json and overlays; choose another "
            f"--out, e.g. {run}-predictions")
    assert {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()} == kept


DETAIL_FIELDS = ("decoder", "detail_width", "detail_depth", "features", "crop_size",
                 "detail_max_side", "tile_size", "mirror_tta")


def test_a_run_made_before_the_detail_decoder_predicts_with_its_own_decoder(dataset, tmp_path):
    """A config.json without the detail decoder's fields is a legacy run: predict rebuilds the
    legacy decoder, whose weights best.pt holds, and writes the same masks as before."""
    run = train(TrainConfig(data=str(dataset), backbone="tiny", cache_dir=str(tmp_path / "c"),
                            run_dir=str(tmp_path / "run"), epochs=1, batch_size=4, e2e_every=0,
                            extract_missing=True, loader_workers=0, overlays=0, device="cpu",
                            decoder="legacy"))
    args = ["--run", str(run), "--data", str(dataset), "--device", "cpu", "--loader-workers", "0"]
    assert predict_main([*args, "--out", str(tmp_path / "before")]) == 0
    recorded = json.loads((run / "config.json").read_text())
    for name in DETAIL_FIELDS:
        del recorded["config"][name]
    (run / "config.json").write_text(json.dumps(recorded))
    assert predict_main([*args, "--out", str(tmp_path / "after")]) == 0
    for a, b in zip(_rows(tmp_path / "before"), _rows(tmp_path / "after"), strict=True):
        assert Path(a["mask"]).read_bytes() == Path(b["mask"]).read_bytes()


def test_the_detail_decoder_predicts_whole_images_at_their_own_size(dataset, tmp_path):
    """Masks at each image's size, cached and live alike, tiles and mirroring included."""
    run = train(TrainConfig(data=str(dataset), backbone="tiny", cache_dir=str(tmp_path / "c"),
                            run_dir=str(tmp_path / "run"), steps=2, batch_size=4, e2e_every=0,
                            extract_missing=True, loader_workers=0, overlays=0, device="cpu",
                            detail_width=4, detail_depth=2, crop_size=32, tile_size=48,
                            mirror_tta=True))
    fresh = make_dataset(tmp_path / "new", 2, seed=7, size=80, start=50)
    out = tmp_path / "pred"
    assert predict_main(["--run", str(run), "--data", str(fresh), "--out", str(out),
                         "--device", "cpu", "--loader-workers", "0"]) == 0
    assert [r["features"] for r in _rows(out)] == ["live", "live"]
    for row in _rows(out):
        assert np.asarray(Image.open(row["mask"])).shape == (80, 80)
