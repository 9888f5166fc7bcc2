"""`predict` on DICOM runs (X-ray angiography cine above all): decode, predict, write a SEG, a
review video and a per-frame CSV per run; no PNG copy of the frames is made.

    python -m pipeline.predict --run runs/20261126-101500 --data cathlab/new_runs --out pred/ \\
        [--frames 10-40] [--masks cathlab/masks]

Each DICOM file under the folders (or each file) given is a run. Its frames are decoded as
`import dicom` decodes them (`pipeline.data.dicom.read_frames`), its view and angles come from its
header as `import dicom` reads them, and a frame's cache key is the sha256 of the PNG `import
dicom` would write for it: frames whose features the run's cache holds are read from it, the
others go through the backbone. Masks come out at the frame's own size
(`pipeline.predict.native_prediction`). Per run, in `<out>/<run path without suffix>/`:

- `seg.dcm`: a DICOM Segmentation object (`pipeline.dicom_seg`), one frame per predicted frame;
- `review.mp4` (or `.gif`): the frames with the mask in red, at the run's frame rate
  (`pipeline.review_video`);
- `frames.csv`: frame, view, features (cached/live), vessel pixels, mean probability over the
  frame, and the scores of frames with a mask.

Masks named as for `import dicom` (`<stem>_<frame>.png`, or `--mask-regex`) score their frames:
per frame in frames.csv, overall, per view and per run in `<out>/report.json`. Only the SEG
carries the header's identifiers; the CSVs, report, video and console carry none.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from pipeline.data.checks import mask_problems
from pipeline.data.dicom import (
    DicomError,
    DicomInfo,
    is_dicom,
    read_frames,
    read_info,
    view_label,
)
from pipeline.data.dicom_import import _keys, _pair_masks
from pipeline.data.images import read_mask, sam3_resize
from pipeline.data.importers import compile_regex, encode_angles, list_problems
from pipeline.data.manifest import UNKNOWN_VIEW, Sample
from pipeline.data.native_samples import NativeSampling, native_item, native_pixels
from pipeline.data.samples import ViewVocabulary
from pipeline.dicom_seg import SegAlgorithm, write_segmentation
from pipeline.durable import write_atomically
from pipeline.errors import UserError
from pipeline.predict import _feature_cache, load_run, model_logits, native_prediction
from pipeline.review_video import VIDEO_FORMATS, frame_rate, write_review_video
from pipeline.train.metrics import SCORES, SegmentationMeter, format_summary, score_image
from pipeline.train.reporting import write_json
from pipeline.train.scoring import scoring_note

FRAMES_PATTERN = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


class DicomRunError(UserError, ValueError):
    """DICOM runs that cannot be predicted; the message lists every problem, each naming its
    file, before any model work."""


def is_dicom_input(paths: list[Path]) -> bool:
    """Whether `--data` names DICOM runs (a folder, or DICOM files) rather than a manifest."""
    return any(Path(p).is_dir() or is_dicom(p) for p in paths)


def parse_frames(text: str | None) -> tuple[int, int | None] | None:
    """`--frames`: "10-40" -> (10, 40), "12" -> (12, 12), None -> None (every frame)."""
    if text is None:
        return None
    match = FRAMES_PATTERN.match(text)
    first, last = (int(match.group(1)), int(match.group(2) or match.group(1))) if match else (0, 0)
    if match is None or first < 1 or last < first:
        raise DicomRunError(f"--frames {text!r}: give FIRST-LAST or one frame number, from 1 "
                            "as in DICOM (e.g. 10-40)")
    return first, last


@dataclass
class DicomRun:
    """One DICOM file to predict: which frames, its view, its masks and its frame rate."""

    info: DicomInfo
    name: str
    """Its path under the folder given (or its stem), without suffix: its output folder."""
    frames: list[int]
    """Source frame numbers to predict, from 1, ascending."""
    rate: Fraction
    rate_source: str
    masks: dict[int, Path] = field(default_factory=dict)

    @property
    def view(self) -> str | None:
        return view_label(*self.info.angles) if self.info.angles else None


def plan_runs(paths: list[Path], frames: tuple[int, int | None] | None = None,
              masks_dir: Path | None = None, mask_regex: str | None = None
              ) -> tuple[list[DicomRun], list[str]]:
    """(runs, notes): every DICOM run under `paths`, with every problem (unreadable file, no
    decoder, no frame in `frames`, masks that pair with nothing or differ in size) raised at
    once as `DicomRunError`; notes name runs without angles and ranges cut to a run's length."""
    files = _files(paths)
    infos, headers, notes, problems = [], {}, [], []
    for path, name in files:
        try:
            info = read_info(path)
            headers[path] = _header(path)
        except DicomError as err:
            problems.append(str(err))
            continue
        if info.problem:
            problems.append(f"{path}: {info.problem}")
            continue
        infos.append((info, name))
    masks: dict[Path, dict[int, Path]] = {}
    if masks_dir is not None and infos:
        try:
            keys = _keys([info for info, _ in infos], None)
            masks, unmatched = _pair_masks(keys, Path(masks_dir), compile_regex(mask_regex,
                                                                           "mask regex"))
        except UserError as err:
            raise DicomRunError(str(err)) from err
        problems += unmatched
    runs = []
    for info, name in infos:
        first, last = frames or (1, info.frames)
        chosen = list(range(first, min(last, info.frames) + 1))
        if not chosen:
            problems.append(f"{info.path}: no frame in --frames {first}-{last} (it has frames "
                            f"1-{info.frames})")
            continue
        if last > info.frames:
            notes.append(f"{info.path}: frames {first}-{info.frames} (it has {info.frames})")
        run_masks = {f: m for f, m in masks.get(info.path, {}).items() if f in chosen}
        problems += [f"{p}: {message}" for f, m in sorted(run_masks.items())
                     for p, message in mask_problems(info, f, m)]
        missing = [k for k in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
                   if not headers[info.path].get(k)]
        if missing:
            problems.append(f"{info.path}: no {', '.join(missing)}: a SEG cannot reference it")
        if info.angles is None:
            notes.append(f"{info.path}: no Positioner Primary/Secondary Angle (0018,1510/1511); "
                         "predicted with the unknown view")
        rate, source = frame_rate(headers[info.path])
        runs.append(DicomRun(info=info, name=name, frames=chosen, rate=rate, rate_source=source,
                             masks=run_masks))
    if problems:
        raise DicomRunError(list_problems("DICOM problems (nothing was predicted)", problems))
    return runs, notes


def _files(paths: list[Path]) -> list[tuple[Path, str]]:
    """(DICOM file, output name) under every folder or file of `paths`."""
    files, problems = [], []
    for given in map(Path, paths):
        if given.is_dir():
            found = [p for p in sorted(given.rglob("*")) if is_dicom(p)]
            if not found:
                problems.append(f"{given}: no DICOM files (a `.dcm` suffix or the DICM "
                                "preamble at byte 128)")
            files += [(p, p.relative_to(given).with_suffix("").as_posix()) for p in found]
        elif is_dicom(given):
            files.append((given, given.stem))
        else:
            problems.append(f"{given}: not a folder or a DICOM file" if given.exists()
                            else f"{given}: not found")
    names = [name for _, name in files]
    problems += [f"{path}: another file also writes to {name}/ (give the folder above both)"
                 for path, name in files if names.count(name) > 1]
    if problems:
        raise DicomRunError(list_problems("DICOM problems (nothing was predicted)", problems))
    return files


def _header(path: Path):
    import pydicom

    try:
        return pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception as err:  # noqa: BLE001 - read_info parsed it already; name the file
        raise DicomError(f"{path}: not a readable DICOM file ({err})") from err


def frame_key(frame: np.ndarray) -> str:
    """The cache key of a decoded frame ((H, W) or (H, W, 3) uint8): the sha256 of the PNG that
    `import dicom` writes for it, so features extracted from imported frames are found."""
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG")
    return hashlib.sha256(buffer.getvalue()).hexdigest()


class FrameSamples(Dataset):
    """Decoded frames of one run as `SegmentationSamples` items without masks: "index", "copy"
    (0), "view", "angles" (4,) float32 and, when `with_image`, "image" (3, R, R) uint8, made from
    the frame exactly as `read_image` makes it from the frame's PNG; with `native` (the detail
    decoder) "pixels" (3, h, w) uint8 and "box" of the whole frame."""

    def __init__(self, frames: np.ndarray, *, view: int, angles: tuple[float, float] | None,
                 resolution: int, with_image: bool, native: NativeSampling | None = None):
        self.frames, self.view, self.with_image = frames, view, with_image
        self.native = native
        self.angles = torch.from_numpy(encode_angles(*angles)) if angles else torch.zeros(4)
        self.transform = sam3_resize(resolution)

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i: int) -> dict:
        item = {"index": torch.tensor(i), "copy": torch.tensor(0),
                "view": torch.tensor(self.view), "angles": self.angles}
        if self.with_image or self.native is not None:
            frame = self.frames[i]
            rgb = frame if frame.ndim == 3 else np.repeat(frame[..., None], 3, axis=-1)
            image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)
            if self.with_image:
                item["image"] = self.transform(image)
            if self.native is not None:
                item |= native_item(native_pixels(image, self.native), None, self.native, None)
        return item


def predict_runs(run_dir: Path, paths: list[Path], out: Path, *, frames: str | None = None,
                 masks_dir: Path | None = None, mask_regex: str | None = None,
                 device: str = "cpu", batch_size: int = 8, loader_workers: int = 2,
                 video: str = "mp4", show: bool = True) -> list[dict]:
    """Predict every DICOM run under `paths` with the run at `run_dir`; returns one summary row
    per run (also `<out>/runs.csv`)."""
    if video not in VIDEO_FORMATS:
        raise DicomRunError(f"--video {video!r}: one of {', '.join(VIDEO_FORMATS)}")
    runs, notes = plan_runs(paths, parse_frames(frames), masks_dir, mask_regex)
    for note in notes:
        print(f"note: {note}", flush=True)
    device = torch.device(device)
    model, state, config, views = load_run(run_dir, device)
    views.warn_unseen([Sample(row=0, image=r.info.path, mask=None, view=r.view, split=None)
                       for r in runs], "the DICOM runs")
    cache = _feature_cache(run_dir, state, config)
    algorithm = SegAlgorithm(run=Path(run_dir).resolve().name, backbone=config.backbone)
    scores = _Scores()
    summaries = []
    for run in runs:
        summary = _predict_run(run, model, config, views, cache, out / run.name, algorithm,
                               scores, device=device, batch_size=batch_size,
                               loader_workers=loader_workers, video=video)
        summaries.append(summary)
        if show:
            print(f"{run.name}: {len(run.frames)} frame(s) ({summary['cached']} from cached "
                  f"features, {summary['live']} through the backbone), {summary['video']} at "
                  f"{float(run.rate):g} fps ({run.rate_source})", flush=True)
    _write_csv(out / "runs.csv", summaries)
    scores.finish(out, mirror_tta=bool(model.native and config.mirror_tta))
    return summaries


def _predict_run(run: DicomRun, model, config, views: ViewVocabulary, cache, out: Path,
                 algorithm: SegAlgorithm, scores: _Scores, *, device, batch_size: int,
                 loader_workers: int, video: str) -> dict:
    """Decode, predict and write one run (seg.dcm, review video, frames.csv)."""
    pixels = read_frames(run.info.path)[[f - 1 for f in run.frames]]  # (n, H, W[, 3]) uint8
    samples = [Sample(row=i + 1, image=run.info.path, mask=run.masks.get(f), view=run.view,
                      split=None, angles=run.info.angles, source=run.info.path, frame=f)
               for i, f in enumerate(run.frames)]
    if cache is not None:
        rows, cached = cache.done_for([frame_key(frame) for frame in pixels])
    else:
        rows, cached = np.full(len(samples), -1), np.zeros(len(samples), bool)

    def dataset(chosen: list[int], with_image: bool, native) -> FrameSamples:
        return FrameSamples(pixels[chosen], view=views.index(run.view), angles=run.info.angles,
                            resolution=model.resolution, with_image=with_image, native=native)

    masks = np.zeros((len(samples), *run.info.size), bool)
    table = [None] * len(samples)
    for i, logits, from_cache in model_logits(model, config, samples, dataset, cached=cached,
                                              rows=rows, cache=cache, device=device,
                                              batch_size=batch_size,
                                              loader_workers=loader_workers):
        masks[i], prob = native_prediction(logits, run.info.size)
        table[i] = {"frame": run.frames[i], "view": run.view or UNKNOWN_VIEW,
                    "features": "cached" if from_cache else "live",
                    "vessel_pixels": int(masks[i].sum()),
                    "mean_probability": f"{float(prob.mean()):.6f}",
                    **scores.add(run.name, samples[i], masks[i], prob)}
    out.mkdir(parents=True, exist_ok=True)
    write_segmentation(run.info.path, run.frames, masks, out / "seg.dcm", algorithm)
    movie = "no video"
    if video != "none":
        path, note = write_review_video(pixels, masks, out / "review", run.rate, video)
        movie = path.name
        if note:
            print(f"note: {run.info.path}: {note}", flush=True)
    _write_csv(out / "frames.csv", table)
    live = int((~cached).sum())
    return {"run": run.name, "frames": len(run.frames), "first": run.frames[0],
            "last": run.frames[-1], "view": run.view or UNKNOWN_VIEW,
            "cached": len(samples) - live, "live": live, "fps": f"{float(run.rate):g}",
            "fps_from": run.rate_source, "seg": f"{run.name}/seg.dcm",
            "video": movie if video == "none" else f"{run.name}/{movie}"}


class _Scores:
    """Scores of frames with masks: per frame (returned for frames.csv), and their means
    overall, per view and per run (report.json and the console)."""

    def __init__(self):
        self.meter, self.per_run, self.scored = SegmentationMeter(), {}, []

    def add(self, run: str, sample: Sample, pred: np.ndarray, prob: np.ndarray) -> dict:
        if sample.mask is None:
            return {}
        scores = score_image(pred, read_mask(sample.mask)[0], prob=prob)
        view = [sample.view or UNKNOWN_VIEW]
        self.meter.add({k: [v] for k, v in scores.items()}, view)
        self.per_run.setdefault(run, SegmentationMeter()).add(
            {k: [v] for k, v in scores.items()}, view)
        self.scored.append(sample)
        return {k: f"{v:.6f}" if not np.isnan(v) else "" for k, v in scores.items()}

    def finish(self, out: Path, *, mirror_tta: bool = False) -> None:
        if not self.scored:
            return
        summary = self.meter.summary()
        write_json(out / "report.json", {
            "predict": summary, "scoring": scoring_note(self.scored, mirror_tta=mirror_tta),
            "per_run": {run: meter.summary() for run, meter in sorted(self.per_run.items())}})
        print(f"scores of {len(self.scored)} frames with masks (each at its own size):\n"
              + format_summary(summary), flush=True)


def _write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    if any(name in fields for name in SCORES):  # score columns always in SCORES' order
        fields = [k for k in fields if k not in SCORES] + list(SCORES)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, restval="")
    writer.writeheader()
    writer.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, buffer.getvalue().encode())
