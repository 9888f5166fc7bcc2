"""What keeps a `predict --out` folder to one prediction, and which split of the run each
predicted image was, so that scores of images the run trained on are never mixed with held-out
ones.

`predict` writes `predictions.csv`, `report.json`, `overlays/` and one `NNNNN_<stem>_mask.png`
per row; a folder that holds any of these is refused unless `--overwrite`, which removes those
files (and only those), as `train_head.py` treats its run directory.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from pipeline.errors import UserError
from pipeline.train.run_files import recorded_splits

PREDICT_FILES = ("predictions.csv", "report.json", "overlays")
MASK_FILE = re.compile(r"^\d{5}_.+_mask\.png$")
NEW = "new"
"""The split of an image the run's manifest did not hold."""


class PredictionFolderError(UserError, RuntimeError):
    """An --out folder that holds an earlier prediction."""


RUN_MARKS = ("config.json", "metrics.jsonl", "best.pt", "last.pt")
"""Files of a training run directory: an --out folder holding any is refused, --overwrite or not
(its report.json and overlays are the run's, not a prediction's)."""


def claim_prediction_folder(out: Path, *, overwrite: bool) -> None:
    """Make `out` ready for one prediction: refuse a training run's directory always, and one
    holding predict's files unless `overwrite`, which removes them (other files stay)."""
    marks = [name for name in RUN_MARKS if (out / name).exists()]
    if marks:
        raise PredictionFolderError(
            f"{out} is a training run's directory ({', '.join(marks)}): predict would replace "
            "its report.json and overlays; choose another --out, e.g. "
            f"{out.parent / (out.name + '-predictions')}")
    held = [out / name for name in PREDICT_FILES if (out / name).exists()]
    if out.is_dir():
        held += sorted(p for p in out.iterdir() if MASK_FILE.match(p.name))
    if held and not overwrite:
        names = ", ".join(p.name for p in held[:3]) + (", ..." if len(held) > 3 else "")
        raise PredictionFolderError(
            f"{out} already holds a prediction ({names}); pass --overwrite to replace it, or "
            "choose another --out")
    for path in held:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def row_splits(run_dir: Path, samples, keys: list[str]) -> list[str]:
    """Per row, the run's split of its image (train, val, test: by sha256, from the run's
    manifest.json), or `NEW` for an image the run never saw. A run from before manifest.json:
    the row's own split column, else "unsplit"."""
    recorded = recorded_splits(run_dir)
    if recorded is None:
        return [s.split or "unsplit" for s in samples]
    return [recorded.get(key, NEW) for key in keys]
