"""Time per frame of `predict` on a DICOM run: decode, cache keys, model, SEG, review video.

    python bench/bench_predict_dicom.py --frames 30 --side 512

Writes a synthetic 12-bit XA run (`--frames` frames of `--side` px), trains a one-step run on
the masked frames of a small one (so the run has a cache, as a real one does), then runs
`pipeline.predict_dicom.predict_runs` on the big run end to end (every frame new: through the
backbone) and times its parts on their own: decoding the run, the cache key of each frame,
loading the run, the SEG and the MP4. "model" is the rest: the backbone, the decoder and
the native-size masks.
"""

from __future__ import annotations

import shutil
import sys
import time
from fractions import Fraction
from pathlib import Path

import _common as C
import numpy as np
import torch

sys.path.insert(0, str(C.REPO / "tests"))

from dicom_files import write_xa  # noqa: E402

from pipeline.config import TrainConfig  # noqa: E402
from pipeline.data.dicom import read_frames  # noqa: E402
from pipeline.data.dicom_import import import_dicom  # noqa: E402
from pipeline.dicom_seg import SegAlgorithm, write_segmentation  # noqa: E402
from pipeline.predict import load_run  # noqa: E402
from pipeline.predict_dicom import frame_key, predict_runs  # noqa: E402
from pipeline.review_video import write_review_video  # noqa: E402
from pipeline.train.launch import train  # noqa: E402


def _run_file(path: Path, frames: int, side: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    stored = rng.integers(2048, 4096, (frames, side, side))
    for i in range(frames):
        stored[i, :, side // 3 + i: side // 3 + i + 6] //= 4
    return write_xa(path, stored.astype(np.uint16), bits_stored=12, angles=(30.0, 20.0))


def main() -> None:
    parser = C.base_parser(__doc__)
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--loader-workers", type=int, default=0)
    args = C.finish_args(parser.parse_args(), needs_weights=False)
    start_load = C.load_average()
    work = args.work_dir / "predict_dicom"
    shutil.rmtree(work, ignore_errors=True)
    small = _run_file(work / "train" / "small.dcm", 4, 64, seed=1)
    (work / "masks").mkdir(parents=True)
    from PIL import Image

    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(work / "masks" / "small_1.png")
    manifest = import_dicom(small.parent, work / "train.csv", frames_dir=work / "frames",
                            masks_dir=work / "masks", split_ratio=None,
                            split_column="train").manifest
    run = train(TrainConfig(data=str(manifest), backbone=args.backbone,
                            cache_dir=str(work / "cache"), run_dir=str(work / "run"), epochs=1,
                            batch_size=1, e2e_every=0, extract_missing=True,
                            allow_empty_val=True, loader_workers=0, overlays=0, device="cpu"))
    big = _run_file(work / "new" / "big.dcm", args.frames, args.side, seed=2)
    torch.set_num_threads(torch.get_num_threads())
    with C.Others() as others:
        start = time.perf_counter()
        predict_runs(Path(run), [big], work / "out", device=args.device,
                     batch_size=args.batch_size, loader_workers=args.loader_workers, show=False)
        total = time.perf_counter() - start
    pixels = read_frames(big)
    masks = pixels < 100
    parts = {
        "load the run": C.best_time(lambda: load_run(Path(run), torch.device(args.device)), 2),
        "decode the run": C.best_time(lambda: read_frames(big), 3),
        "cache keys (PNG sha256)": C.best_time(lambda: [frame_key(f) for f in pixels], 2),
        "SEG (highdicom)": C.best_time(lambda: write_segmentation(
            big, list(range(1, args.frames + 1)), masks, work / "seg.dcm",
            SegAlgorithm(run="bench", backbone=args.backbone)), 2),
        "review MP4 (PyAV)": C.best_time(lambda: write_review_video(
            pixels, masks, work / "review", Fraction(15)), 2),
    }
    parts = {"model (backbone, decoder, native masks)": total - sum(parts.values()), **parts}
    rows = [[name, seconds, 1000 * seconds / args.frames] for name, seconds in parts.items()]
    rows.append(["total (predict_runs, end to end)", total, 1000 * total / args.frames])
    C.report("predict on a DICOM run", args, start_load, [C.table(
        f"{args.frames} frames of {args.side} x {args.side}, 12 bit, every frame through the "
        f"backbone; others used {C.share(others.share)} of the CPUs meanwhile",
        ["part", "s", "ms per frame"], rows)],
        ["the parts are timed on their own (best of 2-3); \"model\" is the total less them"])


if __name__ == "__main__":
    main()
