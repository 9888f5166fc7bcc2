"""What a run directory shows a person: metrics.jsonl, curves.png, overlays/, report.json.

Every JSON file written here is valid strict JSON: NaN and ±Inf become null, Paths strings and
numpy scalars/arrays plain Python. Whole files (report.json, config.json, a truncated
metrics.jsonl) are written to a temporary file beside the target and renamed over it.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from pipeline.durable import disk_full, write_atomically  # noqa: E402
from pipeline.errors import DiskFullError
from pipeline.train.metrics import SCORES, dice  # noqa: E402

E2E_COLOUR = "orange"
BACKGROUND_SCORES = ("specificity", "accuracy", "auc")
"""Scores the background decides (most pixels of a vessel image): they sit near 1, so
curves.png gives them a panel and an axis of their own; every other score of `SCORES` shares
the vessel panel."""
TP_RGB, FP_RGB, FN_RGB = (0.1, 0.9, 0.1), (1.0, 0.1, 0.1), (1.0, 0.0, 1.0)


def _clean(value):
    """NaN/Inf -> None, Paths -> str, numpy scalars/arrays -> Python, recursively."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _atomic_write(path: Path, text: str) -> None:
    """Write `text` to `path` through a fsynced temporary file and os.replace (no temporary
    file is left, whatever fails)."""
    write_atomically(Path(path), text.encode())


def write_json(path: Path, obj) -> None:
    """Write `obj` as indent-2 JSON atomically (NaN -> null, Path -> str); used for config.json."""
    _atomic_write(path, json.dumps(_clean(obj), indent=2, allow_nan=False) + "\n")


def write_report(path: Path, val: dict, scoring: dict | None = None, split: str = "val") -> None:
    """report.json: {split: {<every score in SCORES>, "n", "per_view": {VIEW: {...}}, ...}}, and
    "scoring" (how the scores were computed, `pipeline.train.scoring.scoring_note`) when given."""
    write_json(path, {split: val, **({"scoring": scoring} if scoring is not None else {})})


def dice_hint(val: dict, total_steps: int) -> str:
    """A hint after a validation line whose Dice is 0: the decoder predicts no vessel pixel
    yet, as it does at first; "" otherwise."""
    if val.get("dice") != 0.0:
        return ""
    return (f"  (no vessel predicted yet: a decoder starts out predicting background only; if "
            f"this lasts, {total_steps} steps are too few: give the run more --steps)")


class MetricsLog:
    """metrics.jsonl: one JSON object per epoch and split, appended and fsynced line by line.

    A record holds at least epoch (int, 1-based), split ("train"/"val"), loss, the scores of
    `pipeline.train.metrics.SCORES` (dice, iou, cldice, ...), lr (floats), e2e (bool) and seconds;
    other keys are kept. A last line torn by a crash is
    ignored by `read` and dropped by `truncate_after`.
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def append(self, record: dict) -> None:
        """Write `record` as one JSON line (NaN -> null), flushed and fsynced."""
        line = json.dumps(_clean(record), allow_nan=False) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a+b") as handle:
            size = handle.tell()
            if size > 0:  # a torn last line must not swallow this record
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":
                    line = "\n" + line
            try:
                handle.write(line.encode())
                handle.flush()
                os.fsync(handle.fileno())
            except OSError as err:
                handle.truncate(size)  # no half record
                if disk_full(err):
                    raise DiskFullError(f"No space left on device while appending to "
                                        f"{self.path}; free space in {self.path.parent}, then "
                                        f"continue with `sam3-vessel train --resume "
                                        f"{self.path.parent}`", err.errno) from err
                raise

    def read(self) -> list[dict]:
        """Every complete record in file order; torn or non-object lines are skipped."""
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def truncate_after(self, value: int, key: str = "epoch") -> None:
        """Atomically keep only records with record[key] <= `value` (resume from there)."""
        if not self.path.is_file():
            return
        kept = [r for r in self.read() if r.get(key, 0) <= value]
        _atomic_write(self.path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in kept))


def _x(record: dict):
    """Where a record sits on the curves' x axis: its optimizer step (older runs: its epoch)."""
    return record.get("step", record.get("epoch"))


def _axis(records: list[dict]) -> str:
    return "step" if any("step" in r for r in records) else "epoch"


def _series(records: list[dict], split: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` in `split` records, skipping missing and null values."""
    points = sorted((_x(r), float(r[key])) for r in records
                    if r.get("split") == split and isinstance(r.get(key), (int, float))
                    and _x(r) is not None and math.isfinite(r[key]))
    return [p[0] for p in points], [p[1] for p in points]


def _plot_loss(ax, records: list[dict]) -> None:
    for split, style, colour in (("train", "-o", "C0"), ("val", "-s", "C1")):
        x, y = _series(records, split, "loss")
        if x:
            ax.plot(x, y, style, color=colour, ms=4, label=f"{split} loss")
    ax.set_title("Loss")
    ax.set_ylabel("loss (Dice + BCE)")


def _fit_unit_range(ax, values: list[float]) -> None:
    """y limits around `values` (scores in [0, 1]) with a margin, kept inside [0, 1.0x]."""
    if values:
        low, high = min(values), max(values)
        pad = max(0.02, 0.08 * (high - low))
        ax.set_ylim(max(0.0, low - pad), min(1.0 + pad / 4, high + pad))


def _plot_vessel_scores(ax, records: list[dict], final: dict | None = None) -> None:
    shown = []
    for i, key in enumerate(k for k in SCORES if k not in BACKGROUND_SCORES):
        x, y = _series(records, "val", key)
        if x:
            ax.plot(x, y, "-o", color=f"C{i}", ms=4, label=f"val {key}")
            shown += y
    x, y = _series(records, "train", "dice")
    if x:
        ax.plot(x, y, "--", color="C0", alpha=0.7, marker=".", label="train dice")
        shown += y
    x, y = _series(records, "val", "dice")
    if x:
        best = int(np.argmax(y))
        ax.plot(x[best], y[best], "*", color="gold", mec="k", ms=14, zorder=5,
                label=f"best val dice {y[best]:.3f} ({_axis(records)} {x[best]}, unmirrored)")
        if final and final.get("dice") is not None:
            # The report's score of that step: the same checkpoint with mirror TTA.
            ax.plot(x[best], final["dice"], "D", color="gold", mec="k", ms=8, zorder=5,
                    label=f"report.json: {final['dice']:.3f} (mirror TTA)")
            shown.append(final["dice"])
    _fit_unit_range(ax, shown)
    ax.set_title("Vessel scores")
    ax.set_ylabel("score")


def _plot_background_scores(ax, records: list[dict]) -> None:
    shown = []
    for i, key in enumerate(BACKGROUND_SCORES, start=4):
        x, y = _series(records, "val", key)
        if x:
            ax.plot(x, y, "-o", color=f"C{i}", ms=4, label=f"val {key}")
            shown += y
    _fit_unit_range(ax, shown)
    ax.set_title("Scores the background decides")
    ax.set_ylabel("score (own axis: near 1)")


def _plot_drift(ax, records: list[dict]) -> None:
    """1 - cosine on a log axis (cosines sit at 0.9999...), each point labelled with the cosine."""
    x, y = _series(records, "train", "drift_cosine")
    gap = [max(1.0 - v, 1e-9) for v in y]
    ax.plot(x, gap, "-o", color="C3", ms=5, label="1 - cosine(cached, live)")
    middle = (min(_x(r) or 1 for r in records) + max(_x(r) or 1 for r in records)) / 2
    for epoch, value, cosine in zip(x, gap, y, strict=True):
        right = epoch > middle  # keep the label inside the axes
        ax.annotate(f"cos {cosine:.6f}", (epoch, value), textcoords="offset points",
                    xytext=(-6 if right else 6, 6), ha="right" if right else "left",
                    fontsize=7, color="C3")
    ax.set_yscale("log")
    ax.margins(y=0.25)
    ax.set_title("Cache drift after end-to-end steps")
    ax.set_ylabel("1 - cosine (lower: cache faithful)")


def _plot_wait(ax, records: list[dict]) -> None:
    x, y = _series(records, "train", "data_wait")
    ax.plot(x, [100 * v for v in y], "-o", color="C4", ms=4, label="train data wait")
    ax.set_ylim(0, 100)
    ax.set_title("Time waiting for data")
    ax.set_ylabel("% of training time")


def plot_curves(records: list[dict], out_png: Path, final: dict | None = None) -> None:
    """curves.png (`curves_figure`) from metrics records, written whole or not at all."""
    fig = curves_figure(records, final)
    png = io.BytesIO()
    fig.savefig(png, dpi=120, format="png")
    plt.close(fig)
    write_atomically(Path(out_png), png.getvalue())


def curves_figure(records: list[dict], final: dict | None = None):
    """The figure of curves.png: loss, the vessel scores (train Dice dashed), the scores the
    background decides on an axis of their own and, when logged, cache drift cosine and
    data-wait share, against the optimizer step (the epoch for records without one); intervals
    that ran end to end (e2e) shaded. Each panel's legend sits under it, off the curves.

    `records` as `MetricsLog.read()` returns them; works for one epoch and without val records.
    `final`: the best step's scores with mirror TTA (report.json's), marked beside its
    unmirrored periodic score.
    """
    panels = [_plot_loss, functools.partial(_plot_vessel_scores, final=final)]
    if any(_series(records, "val", key)[0] for key in BACKGROUND_SCORES):
        panels.append(_plot_background_scores)
    if _series(records, "train", "drift_cosine")[0]:
        panels.append(_plot_drift)
    if _series(records, "train", "data_wait")[0]:
        panels.append(_plot_wait)
    cols = 2 if len(panels) == 4 else min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.4 * rows), squeeze=False,
                             layout="constrained")
    axis = _axis(records)
    e2e = e2e_spans(records)
    points = sorted({_x(r) for r in records if _x(r) is not None}) or [1]
    for ax, draw in zip(axes.flat, panels, strict=False):
        for left, right in e2e:
            ax.axvspan(left, right, color=E2E_COLOUR, alpha=0.18, lw=0)
        draw(ax, records)
        pad = max(0.6, 0.03 * (points[-1] - points[0]))
        ax.set_xlim(min(points[0], *(left for left, _ in e2e or [(points[0], 0)])) - pad,
                    points[-1] + pad)
        if points[-1] - points[0] < 15:
            ax.set_xticks(range(int(points[0]), int(points[-1]) + 1))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(axis)
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if e2e:
            handles.append(Patch(color=E2E_COLOUR, alpha=0.3))
            labels.append(f"end-to-end {'steps' if axis == 'step' else 'epoch'}")
        if handles:  # under the axes, never over a curve
            ax.legend(handles, labels, fontsize=8, loc="upper center", ncol=2,
                      bbox_to_anchor=(0.5, -0.14), frameon=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    last = points[-1]
    fig.suptitle(f"Training curves ({last} {axis}{'s' if last != 1 else ''})")
    return fig


def e2e_spans(records: list[dict]) -> list[tuple[float, float]]:
    """(left, right) x-spans of the training intervals that ran end to end: an interval covers
    its `steps` up to its step (one unit for epoch records). Only train records count: a val
    record's `e2e` says its features were live, which stays true after end-to-end steps until
    the cache is refreshed."""
    return sorted({(_x(r) - r.get("steps", 1) + 0.5, _x(r) + 0.5) for r in records
                   if r.get("e2e") and r.get("split") == "train" and _x(r) is not None})


def error_overlay(image_rgb: np.ndarray, mask: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Errors painted on a dimmed image.

    `image_rgb` (R, R, 3) float in [0, 1]; `mask`, `pred` (R, R) bool. Returns (R, R, 3) float
    in [0, 1]: true positives TP_RGB (green), false positives FP_RGB (red), false negatives
    FN_RGB (magenta), every other pixel the image times 0.6.
    """
    mask, pred = np.asarray(mask, bool), np.asarray(pred, bool)
    out = np.asarray(image_rgb, dtype=np.float64) * 0.6
    out[mask & pred] = TP_RGB
    out[~mask & pred] = FP_RGB
    out[mask & ~pred] = FN_RGB
    return out


def _numpy(array, dtype) -> np.ndarray:
    """numpy or torch (any device, any float dtype) -> numpy of `dtype`."""
    if hasattr(array, "detach"):
        array = array.detach().cpu()
        array = array.float() if array.is_floating_point() else array
        array = array.numpy()
    return np.asarray(array).astype(dtype, copy=False)


def _safe(name: str) -> str:
    stem = Path(name).stem or "sample"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)


def save_overlays(out_dir: Path, images, masks, preds, names: list[str], views: list[str],
                  scores: list[dict] | None = None) -> list[Path]:
    """One PNG per sample, `out_dir/<index:02d>_<safe name>.png`, with 4 panels: image, ground
    truth, prediction, errors on the image (TP green, FP red, FN magenta); a sample whose mask
    is None gets 3: image, prediction, prediction on the image (red).

    `images[i]` (3, H, W) float in [-1, 1] (shown as (x + 1) / 2 clipped); `masks[i]` and
    `preds[i]` (H, W) bool, numpy or torch: a batch (N, ...) or a list of images that may differ
    in size. The title's Dice is `scores[i]["dice"]` when given, else computed here. Returns the
    N paths written.
    """
    if not len(images) == len(masks) == len(preds) == len(names) == len(views):
        raise ValueError(f"images/masks/preds/names/views lengths differ: {len(images)}, "
                         f"{len(masks)}, {len(preds)}, {len(names)}, {len(views)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, name in enumerate(names):
        rgb = np.clip((_numpy(images[i], np.float32).transpose(1, 2, 0) + 1) / 2, 0, 1)
        pred = _numpy(preds[i], bool)
        mask = None if masks[i] is None else _numpy(masks[i], bool)
        fig, title = _overlay_figure(rgb, mask, pred)
        given = scores[i].get("dice") if scores else None
        if mask is not None:
            title += f"   Dice {float(given) if given is not None else dice(pred, mask):.3f}"
        fig.suptitle(f"{name}   view {views[i]}{title}", fontsize=12)
        fig.tight_layout()
        path = out_dir / f"{i:02d}_{_safe(name)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def _overlay_figure(rgb: np.ndarray, mask: np.ndarray | None, pred: np.ndarray):
    """The panels of one overlay: (figure, title suffix)."""
    if mask is None:
        panels = (("image", rgb), (f"prediction ({int(pred.sum())} px)", pred),
                  ("prediction on the image", error_overlay(rgb, np.zeros_like(pred), pred)))
        suffix = "   (no mask)"
    else:
        panels = (("image", rgb), (f"ground truth ({int(mask.sum())} px)", mask),
                  (f"prediction ({int(pred.sum())} px)", pred),
                  ("errors: TP green, FP red, FN magenta", error_overlay(rgb, mask, pred)))
        suffix = ""
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.6))
    for ax, (title, picture) in zip(axes, panels, strict=True):
        ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None, vmin=0, vmax=1)
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    return fig, suffix
