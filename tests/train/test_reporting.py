"""Run-directory reporting: metrics.jsonl, curves.png, overlays/, report.json, config.json."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.train.reporting import (
    FN_RGB,
    FP_RGB,
    TP_RGB,
    MetricsLog,
    curves_figure,
    dice_hint,
    error_overlay,
    plot_curves,
    save_overlays,
    write_json,
    write_report,
)


def _record(epoch: int, split: str, **extra) -> dict:
    base = {"epoch": epoch, "split": split, "loss": 1.0 / epoch, "dice": 0.1 * epoch,
            "iou": 0.05 * epoch, "cldice": 0.08 * epoch, "lr": 1e-4, "e2e": False,
            "seconds": 2.5}
    return {**base, **extra}


def _records(epochs: int, *, e2e_every: int = 0, val: bool = True) -> list[dict]:
    out = []
    for epoch in range(1, epochs + 1):
        e2e = bool(e2e_every) and epoch % e2e_every == 0
        train = _record(epoch, "train", e2e=e2e, data_wait=0.05 * epoch)
        if e2e:
            train["drift_cosine"] = 1.0 - 0.01 * epoch
        out.append(train)
        if val:
            out.append(_record(epoch, "val", e2e=e2e, dice=0.12 * epoch))
    return out


def test_metrics_round_trip(tmp_path):
    log = MetricsLog(tmp_path / "run" / "metrics.jsonl")
    assert log.read() == []
    records = _records(3)
    records[0]["per_view"] = {"LAO": {"dice": 0.5, "n": 3}}
    for record in records:
        log.append(record)
    assert log.read() == records
    assert len(log.path.read_text().splitlines()) == 6


def test_nan_is_written_as_null(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.append(_record(1, "val", dice=float("nan"), iou=float("inf"), lr=np.float32(1e-4),
                       cache=Path("a/b")))
    log.append(_record(2, "train"))
    lines = log.path.read_text().splitlines()
    assert "NaN" not in lines[0] and "Infinity" not in lines[0]
    parsed = [json.loads(line) for line in lines]  # strict JSON per line
    assert parsed[0]["dice"] is None and parsed[0]["iou"] is None
    assert parsed[0]["cache"] == "a/b"
    assert parsed[0]["lr"] == pytest.approx(1e-4)
    assert parsed[1]["dice"] == pytest.approx(0.2)


def test_truncate_after_keeps_completed_epochs(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for record in _records(4):
        log.append(record)
    log.truncate_after(2)
    kept = log.read()
    assert [(r["epoch"], r["split"]) for r in kept] == [
        (1, "train"), (1, "val"), (2, "train"), (2, "val")]
    assert all(json.loads(line) for line in log.path.read_text().splitlines())
    assert not list(tmp_path.glob("*.tmp"))  # the temporary file was renamed away
    log.truncate_after(0)
    assert log.read() == [] and log.path.read_text() == ""


def test_truncate_after_drops_torn_last_line(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for record in _records(2):
        log.append(record)
    log.append(_record(3, "train"))
    with log.path.open("a") as handle:  # a crash mid-write of epoch 3's val record
        handle.write('{"epoch": 3, "split": "val", "lo')
    assert [(r["epoch"], r["split"]) for r in log.read()][-1] == (3, "train")
    assert len(log.read()) == 5
    log.truncate_after(2)
    text = log.path.read_text()
    assert len(text.splitlines()) == 4 and '"lo' not in text.splitlines()[-1][-5:]
    assert [json.loads(line)["epoch"] for line in text.splitlines()] == [1, 1, 2, 2]


def test_append_after_torn_line_keeps_new_record(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.append(_record(1, "train"))
    with log.path.open("a") as handle:
        handle.write('{"epoch": 2, "spl')
    log.append(_record(2, "train"))
    assert [r["epoch"] for r in log.read()] == [1, 2]


def _open_png(path: Path) -> Image.Image:
    image = Image.open(path)
    image.load()
    return image


def test_plot_curves_several_epochs_with_e2e(tmp_path):
    out = tmp_path / "curves.png"
    plot_curves(_records(8, e2e_every=3), out)
    image = _open_png(out)
    assert image.format == "PNG"
    width, height = image.size
    assert 800 <= width <= 3000 and 500 <= height <= 2000  # 2 x 2 panels at dpi 120
    pixels = np.asarray(image.convert("RGB")).astype(int)
    orange = (pixels[..., 0] > 230) & (np.abs(pixels[..., 1] - 220) < 25) & (pixels[..., 2] < 215)
    assert orange.sum() > 100  # e2e epochs are shaded


def test_curves_put_background_scores_on_their_own_axis_and_legends_off_the_data():
    records = _records(6, e2e_every=3)
    for record in records:
        if record["split"] == "val":
            record.update(specificity=0.97, accuracy=0.96, auc=0.99)
    fig = curves_figure(records)
    fig.canvas.draw()
    panels = [ax for ax in fig.axes if ax.get_visible()]
    lines = {line.get_label(): ax for ax in panels for line in ax.get_lines()}
    assert lines["val dice"] is lines["val iou"] is not lines["val auc"]
    assert lines["val auc"] is lines["val specificity"] is lines["val accuracy"]
    low, high = lines["val auc"].get_ylim()
    assert low > 0.9 and high - low < 0.1  # near 1: an axis fitted to them, not 0-1
    renderer = fig.canvas.get_renderer()
    for ax in panels:
        legend = ax.get_legend()
        assert legend is not None
        assert not legend.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))
    plt.close(fig)


def test_curves_say_the_best_periodic_score_is_unmirrored_and_show_the_reports():
    records = _records(6)
    best = max((r for r in records if r["split"] == "val"), key=lambda r: r["dice"])
    fig = curves_figure(records, final={"dice": best["dice"] + 0.01})
    labels = [line.get_label() for ax in fig.axes for line in ax.get_lines()]
    step = best["epoch"]
    assert f"best val dice {best['dice']:.3f} (epoch {step}, unmirrored)" in labels
    assert f"report.json: {best['dice'] + 0.01:.3f} (mirror TTA)" in labels
    plt.close(fig)
    plain = [line.get_label() for ax in curves_figure(records).axes for line in ax.get_lines()]
    assert not any(label.startswith("report.json") for label in plain)
    plt.close("all")


def test_plot_curves_single_epoch_and_no_val(tmp_path):
    plot_curves(_records(1), tmp_path / "one.png")
    plot_curves(_records(3, val=False), tmp_path / "train_only.png")
    plot_curves([], tmp_path / "empty.png")
    for name in ("one.png", "train_only.png", "empty.png"):
        width, height = _open_png(tmp_path / name).size
        assert width > 600 and 300 < height < width


def test_error_overlay_colours_exactly():
    image = np.full((4, 4, 3), 0.5)
    mask = np.zeros((4, 4), bool)
    pred = np.zeros((4, 4), bool)
    mask[0, 0] = pred[0, 0] = True  # true positive
    pred[1, 1] = True  # false positive
    mask[2, 2] = True  # false negative
    out = error_overlay(image, mask, pred)
    assert out.shape == (4, 4, 3) and out.min() >= 0 and out.max() <= 1
    np.testing.assert_allclose(out[0, 0], TP_RGB)
    np.testing.assert_allclose(out[1, 1], FP_RGB)
    np.testing.assert_allclose(out[2, 2], FN_RGB)
    np.testing.assert_allclose(out[3, 3], 0.3)  # dimmed background
    assert FP_RGB[0] > 2 * max(FP_RGB[1:]) and TP_RGB[1] > 2 * max(TP_RGB[0], TP_RGB[2])
    np.testing.assert_array_equal(image, 0.5)  # input untouched


def _samples(n: int, size: int = 48):
    rng = np.random.default_rng(0)
    grey = rng.uniform(-1, 1, (n, 1, size, size)).repeat(3, axis=1)  # an X-ray: R = G = B
    images = torch.tensor(grey, dtype=torch.float32)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    masks[:, :, size // 3: size // 3 + 4] = True
    preds = masks.clone()
    preds[:, : size // 2, size // 2:] = True  # a large false-positive block, top right
    return images, masks, preds


def test_save_overlays_files_and_panels(tmp_path):
    images, masks, preds = _samples(3)
    names = ["a 1.png", "b/2.png", "c.tif"]
    paths = save_overlays(tmp_path / "overlays", images, masks, preds, names,
                          ["LAO", "RAO", "AP"])
    assert [p.name for p in paths] == ["00_a_1.png", "01_2.png", "02_c.png"]
    assert sorted(p.name for p in (tmp_path / "overlays").iterdir()) == [p.name for p in paths]
    image = _open_png(paths[0])
    width, height = image.size
    assert width > 2 * height  # four panels in a row
    pixels = np.asarray(image.convert("RGB")).astype(int)
    right = pixels[:, 3 * width // 4:]  # the error-overlay panel
    red = (right[..., 0] > 200) & (right[..., 1] < 80) & (right[..., 2] < 80)
    green = (right[..., 1] > 200) & (right[..., 0] < 80) & (right[..., 2] < 80)
    assert red.sum() > 500 and green.sum() > 50
    left = pixels[:, : width // 4]  # the plain image shows no red block
    assert ((left[..., 0] > 200) & (left[..., 1] < 80) & (left[..., 2] < 80)).sum() < 50


def test_save_overlays_numpy_and_given_scores(tmp_path):
    images, masks, preds = (t.numpy() for t in _samples(2, size=16))
    paths = save_overlays(tmp_path, images, masks, preds, ["x.png", "y.png"], ["AP", "LAT"],
                          scores=[{"dice": 0.25}, {"dice": float("nan")}])
    assert len(paths) == 2 and all(p.is_file() for p in paths)
    with pytest.raises(ValueError):
        save_overlays(tmp_path, images, masks, preds, ["only-one.png"], ["AP"])


def test_save_overlays_of_images_of_different_sizes_with_and_without_masks(tmp_path):
    (wide, wide_mask, wide_pred), (tall, _, tall_pred) = (
        (t[0] for t in _samples(1, size=size)) for size in (40, 24))
    wide, wide_mask, wide_pred = wide[:, :20], wide_mask[:20], wide_pred[:20]  # 20 x 40
    paths = save_overlays(tmp_path, [wide, tall], [wide_mask, None], [wide_pred, tall_pred],
                          ["wide.png", "tall.png"], ["AP", "AP"])
    four, three = (_open_png(p).size for p in paths)
    assert four[0] / four[1] > three[0] / three[1]  # a mask adds the truth and errors panels
    assert three[0] > 2 * three[1]  # image, prediction, prediction on the image


def test_write_report_round_trip(tmp_path):
    val = {"dice": 0.71, "iou": 0.55, "cldice": float("nan"), "n": 12, "epoch": 4,
           "per_view": {"LAO": {"dice": 0.7, "iou": 0.5, "cldice": 0.6, "n": 6},
                        "RAO": {"dice": np.float64(0.72), "iou": 0.6, "cldice": 0.6, "n": 6}}}
    path = tmp_path / "report.json"
    write_report(path, val, scoring={"size": "native"})
    text = path.read_text()
    assert json.loads(text)["scoring"] == {"size": "native"}
    assert "NaN" not in text and text.startswith('{\n  "val"')
    loaded = json.loads(text)["val"]
    assert loaded["cldice"] is None and loaded["n"] == 12 and loaded["epoch"] == 4
    assert loaded["per_view"]["RAO"]["dice"] == pytest.approx(0.72)
    assert {k: v for k, v in loaded.items() if k != "cldice"} == {
        k: v for k, v in val.items() if k != "cldice"}


def test_write_json_atomic_and_clean(tmp_path):
    path = tmp_path / "sub" / "config.json"
    write_json(path, {"root": Path("/data/x"), "lr": float("inf"), "sizes": (1, 2),
                      "arr": np.arange(3)})
    write_json(path, {"root": Path("/data/y"), "lr": 1e-4, "sizes": [3], "arr": []})
    loaded = json.loads(path.read_text())
    assert loaded == {"root": "/data/y", "lr": 1e-4, "sizes": [3], "arr": []}
    assert [p.name for p in path.parent.iterdir()] == ["config.json"]
    write_json(path, {"x": math.nan, "y": [np.int64(3)], "z": np.arange(2)})
    assert json.loads(path.read_text()) == {"x": None, "y": [3], "z": [0, 1]}


def test_plot_curves_drift_without_data_wait(tmp_path):
    records = [_record(1, "train", e2e=True, drift_cosine=1.0), _record(1, "val"),
               _record(2, "train", drift_cosine=0.999994), _record(2, "val", dice=None)]
    plot_curves(records, tmp_path / "drift.png")
    width, height = _open_png(tmp_path / "drift.png").size
    assert width > 2.5 * height  # loss, quality and drift panels side by side


def test_curves_shade_exactly_the_end_to_end_epochs(tmp_path):
    from pipeline.train.reporting import e2e_spans

    # Epoch 2 trained end to end; val stays live (e2e) until the cache is refreshed.
    records = [{"epoch": e, "split": split, "loss": 1.0, "dice": 0.5,
                "e2e": (e == 2) if split == "train" else e >= 2}
               for e in range(1, 5) for split in ("train", "val")]
    assert e2e_spans(records) == [(1.5, 2.5)]  # not every epoch from 2 on
    plot_curves(records, tmp_path / "curves.png")
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]


def test_a_validation_dice_of_zero_gets_a_hint():
    assert dice_hint({"dice": 0.0}, 20).startswith("  (no vessel predicted yet: ")
    assert "20 steps are too few: give the run more --steps" in dice_hint({"dice": 0.0}, 20)
    assert dice_hint({"dice": 0.41}, 20) == dice_hint({}, 20) == ""
