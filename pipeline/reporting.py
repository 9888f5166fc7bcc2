"""What a run directory shows a person: metrics.jsonl, curves.png, overlays/, report.json."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _clean(value):
    """NaN/Inf -> None, Paths -> str, numpy scalars -> Python, recursively."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: Path, obj) -> None:
    """Write `obj` as indented JSON through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_clean(obj), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def write_report(path: Path, val: dict) -> None:
    """report.json: {"val": {"dice", "iou", "cldice", "n", "per_view": {...}, ...}}."""
    write_json(path, {"val": val})


class MetricsLog:
    """metrics.jsonl: one JSON object per epoch and split, appended and fsynced."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def append(self, record: dict) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(_clean(record), allow_nan=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def read(self) -> list[dict]:
        """Every complete record; a line torn by a crash is skipped."""
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def truncate_after(self, epoch: int) -> None:
        """Keep only records of epochs <= `epoch` (a resume drops a half-finished epoch)."""
        kept = [r for r in self.read() if r.get("epoch", 0) <= epoch]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)


def _series(records: list[dict], split: str, key: str) -> tuple[list[int], list[float]]:
    points = [(r["epoch"], r[key]) for r in records
              if r.get("split") == split and r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot_curves(records: list[dict], out_png: Path) -> None:
    """Loss, validation metrics and (when logged) feature drift per epoch; e2e epochs shaded."""
    extra = any(r.get("drift_cosine") is not None for r in records)
    fig, axes = plt.subplots(1, 3 if extra else 2, figsize=(15 if extra else 10, 4))
    e2e_epochs = sorted({r["epoch"] for r in records if r.get("split") == "train" and r.get("e2e")})
    for ax in axes:
        for epoch in e2e_epochs:
            ax.axvspan(epoch - 0.5, epoch + 0.5, color="orange", alpha=0.15, lw=0)
        ax.grid(alpha=0.3)
        ax.set_xlabel("epoch")
    for split, style in (("train", "-o"), ("val", "-s")):
        axes[0].plot(*_series(records, split, "loss"), style, label=f"{split} loss", ms=3)
    axes[0].set_title("loss (Dice + BCE); shaded: end-to-end epochs")
    for key, colour in (("dice", "C0"), ("iou", "C1"), ("cldice", "C2")):
        axes[1].plot(*_series(records, "val", key), "-o", color=colour, label=f"val {key}", ms=3)
    axes[1].plot(*_series(records, "train", "dice"), "--", color="C0", label="train dice")
    axes[1].set_ylim(0, 1)
    axes[1].set_title("segmentation quality")
    if extra:
        axes[2].plot(*_series(records, "train", "drift_cosine"), "-o", color="C3", ms=3,
                     label="cached vs live cosine")
        axes[2].set_title("cache drift after end-to-end epochs")
        axes[2].ticklabel_format(axis="y", useOffset=False)
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def error_overlay(image_rgb: np.ndarray, mask: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """(R, R, 3) float [0, 1] image with true positives green, false positives red and false
    negatives magenta; `mask`, `pred` (R, R) bool."""
    out = image_rgb.copy() * 0.6
    out[mask & pred] = (0.1, 0.9, 0.1)
    out[~mask & pred] = (0.95, 0.1, 0.1)
    out[mask & ~pred] = (0.9, 0.1, 0.9)
    return out


def _dice(mask: np.ndarray, pred: np.ndarray) -> float:
    total = mask.sum() + pred.sum()
    return 1.0 if total == 0 else float(2 * (mask & pred).sum() / total)


def save_overlays(out_dir: Path, images, masks, preds, names: list[str], views: list[str],
                  scores: list[dict] | None = None) -> list[Path]:
    """One PNG per sample: image, ground truth, prediction, errors on the image.

    `images` (N, 3, R, R) float in [-1, 1]; `masks`, `preds` (N, R, R) bool.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images, masks, preds = (np.asarray(a) for a in (images, masks, preds))
    paths = []
    for i, name in enumerate(names):
        rgb = np.clip((images[i].transpose(1, 2, 0) + 1) / 2, 0, 1)
        mask, pred = masks[i].astype(bool), preds[i].astype(bool)
        dice = scores[i]["dice"] if scores else _dice(mask, pred)
        fig, axes = plt.subplots(1, 4, figsize=(12, 3.3))
        panels = (("image", rgb), ("ground truth", mask), ("prediction", pred),
                  ("errors: TP green, FP red, FN magenta", error_overlay(rgb, mask, pred)))
        for ax, (title, picture) in zip(axes, panels, strict=True):
            ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
        fig.suptitle(f"{name}  view {views[i]}  Dice {dice:.3f}", fontsize=10)
        fig.tight_layout()
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(name).stem)
        path = out_dir / f"{i:02d}_{safe}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
