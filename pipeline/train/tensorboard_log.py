"""A live view of a run in TensorBoard: `<run-dir>/tensorboard/`, written by rank 0 only.

    tensorboard --logdir runs/        # every run side by side

`TensorBoardLog.record` takes the same dicts that go to metrics.jsonl (`reporting.MetricsLog`)
and logs every numeric field of them as a scalar `<split>/<field>`, nested dicts flattened
(`val/per_view/LAO/dice`), so a new score appears without a change here. The global step is the
record's `step` when it has one, else its `epoch`. Overlays (image, truth, prediction, errors)
go in as images at each validation; the resolved config as text and as hparams with the final
scores.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from pipeline.train.reporting import _clean, _numpy, error_overlay

LOG_DIR = "tensorboard"
# Identify a record or are not measurements; everything else numeric is logged.
NOT_SCALARS = ("step", "epoch", "split")


def scalar_fields(record: dict, prefix: str = "") -> dict[str, float]:
    """{tag suffix: value} of every finite number (bools as 0/1) in `record`, nested dicts
    flattened with "/"; `step`, `epoch` and `split` at the top level are left out."""
    out = {}
    for key, value in record.items():
        if not prefix and key in NOT_SCALARS:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalar_fields(value, f"{name}/"))
        elif isinstance(value, (bool, int, float, np.number)) and math.isfinite(float(value)):
            out[name] = float(value)
    return out


def record_step(record: dict) -> int:
    """The global step of a metrics record: its `step` if present, else its `epoch`."""
    return int(record["step"] if "step" in record else record["epoch"])


def _hparam_value(value):
    """TensorBoard's hparams take int, float, str or bool; everything else becomes its JSON."""
    if isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value)


class TensorBoardLog:
    """Scalars, overlay images, config and hparams of one run, into `run_dir/tensorboard/`.

    `config`: the resolved config as a flat dict (`dataclasses.asdict(TrainConfig)`).
    `purge_step`: on a resume, the first step logged again; TensorBoard hides what an earlier
    process logged from that step on, so a resumed run shows one curve.
    """

    def __init__(self, run_dir: Path, config: dict, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(run_dir) / LOG_DIR
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)
        self.config = _clean(config)
        text = json.dumps(self.config, indent=2)
        # Markdown: a code block keeps the indentation.
        self.writer.add_text("config", "```\n" + text + "\n```", 0)

    def record(self, record: dict) -> None:
        """Log every numeric field of one metrics record as `<split>/<field>`."""
        step, split = record_step(record), record.get("split", "run")
        for name, value in scalar_fields(record).items():
            self.writer.add_scalar(f"{split}/{name}", value, step)
        self.writer.flush()

    def overlays(self, step: int, images, masks, preds, names: list[str]) -> None:
        """One image `overlays/<name>` per sample: image | truth | prediction | errors.

        images (N, 3, R, R) float in [-1, 1]; masks, preds (N, R, R) bool (numpy or torch),
        as `reporting.save_overlays` takes them.
        """
        images = np.clip((_numpy(images, np.float32) + 1) / 2, 0, 1)
        masks, preds = _numpy(masks, bool), _numpy(preds, bool)
        for image, mask, pred, name in zip(images, masks, preds, names, strict=True):
            rgb = image.transpose(1, 2, 0)
            panels = [rgb, np.repeat(mask[..., None], 3, -1).astype(np.float32),
                      np.repeat(pred[..., None], 3, -1).astype(np.float32),
                      error_overlay(rgb, mask, pred)]
            strip = np.concatenate(panels, axis=1)  # (R, 4R, 3)
            self.writer.add_image(f"overlays/{name}", strip, step, dataformats="HWC")
        self.writer.flush()

    def hparams(self, scores: dict) -> None:
        """The config as hparams, with the final scores (every number of `scores`, e.g. the best
        validation's, and its step or epoch) as its metrics `best/<field>`."""
        from torch.utils.tensorboard.summary import hparams

        fields = scalar_fields(scores) | {k: float(scores[k]) for k in NOT_SCALARS[:2]
                                          if isinstance(scores.get(k), (int, float))}
        metrics = {f"best/{k}": v for k, v in fields.items()}
        experiment, start, end = hparams(
            {k: _hparam_value(v) for k, v in self.config.items()}, metrics)
        writer = self.writer._get_file_writer()
        for summary in (experiment, start, end):
            writer.add_summary(summary)
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, 0)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
