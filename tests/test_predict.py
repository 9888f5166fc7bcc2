import csv
from pathlib import Path

import numpy as np
from conftest import make_dataset
from PIL import Image

from pipeline.config import TrainConfig
from pipeline.predict import main as predict_main
from pipeline.training import train


def _rows(out):
    with (out / "predictions.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_new_images_go_through_the_backbone_and_masks_keep_their_size(dataset, tmp_path):
    run = train(TrainConfig(data=str(dataset), backbone="tiny", cache_dir=str(tmp_path / "c"),
                            run_dir=str(tmp_path / "run"), epochs=1, batch_size=4, e2e_every=0,
                            extract_missing=True, loader_workers=0, overlays=0, device="cpu"))
    fresh = make_dataset(tmp_path / "new", 2, seed=7, size=80, start=50)
    out = tmp_path / "pred"
    assert predict_main(["--run", str(run), "--data", str(fresh), "--out", str(out),
                         "--device", "cpu"]) == 0
    rows = _rows(out)
    assert [r["features"] for r in rows] == ["live", "live"]
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
