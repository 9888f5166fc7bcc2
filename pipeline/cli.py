"""The command lines of `extract`, `train`, `predict` and `export`: flags parsed, checked and
paths looked up before anything heavy is imported.

Importing torch, peft and sam3 takes seconds (BENCHMARKS.md, "Help and argument errors"), so
each `*_main` here imports only `pipeline.config` (torch-free) and the standard library until
its flags are parsed, validated and every path they name is found; then it imports the module
that does the work. `--help`, a mistyped flag and a mistyped path answer in well under a second.
`sam3-vessel` (`pipeline.commands`), the two scripts and `python -m pipeline.predict|export`
all run these functions.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline.config import (
    ExtractConfig,
    TrainConfig,
    add_arguments,
    describe,
    from_arguments,
    given_fields,
)
from pipeline.errors import UsageError, check_path, run_command
from pipeline.train.run_files import check_run

EXTRACT_HELP = """Stage A: compute SAM 3 backbone features once and keep them in the feature cache.

    sam3-vessel extract --data demo --backbone tiny                  # the CPU demo
    sam3-vessel extract --data manifest.csv --gpus 0,1               # every listed GPU
    sam3-vessel extract --data manifest.csv --levels 1x,2x,4x --adapter runs/x/adapter
    torchrun --nnodes 2 --nproc-per-node 8 ... extract_features.py --data manifest.csv

Images already in the cache of the same model, adapter and preprocessing are not extracted
again; a killed run resumes where it stopped."""

TRAIN_HELP = """Stage B: train the view-conditioned decoder (and the LoRA adapter) from the cache.

    sam3-vessel train --data demo --backbone tiny --steps 30               # the CPU demo
    sam3-vessel train --data manifest.csv --gpus 0,1 --e2e-every 5         # DDP on two GPUs
    sam3-vessel train --data manifest.csv --extract-missing --refresh-cache
    sam3-vessel train --resume runs/20261126-101500                        # continue a run
    sam3-vessel train --resume runs/20261126-101500 --steps 2000           # ... for longer
    torchrun --nnodes 2 --nproc-per-node 8 ... train_head.py --data manifest.csv

Writes config.json, metrics.jsonl, best.pt, last.pt, adapter/, report.json, curves.png and
overlays/ into --run-dir (default runs/<timestamp>)."""

PREDICT_HELP = """Vessel masks for new images from a trained run.

    sam3-vessel predict --run runs/demo --data new.csv --out predictions/
    sam3-vessel predict --run runs/demo --data demo --out predictions/        # the demo set
    sam3-vessel predict --run runs/angio --data cathlab/new_runs --out reviewed/   # DICOM runs

A manifest's rows get one 0/255 PNG mask each at the image's own size, predictions.csv, and,
for rows with a mask, every score (report.json, the console, overlays/). DICOM runs (folders or
files) get a Segmentation object, a review video and frames.csv each (pipeline.predict_dicom)."""

EXPORT_HELP = """SAM 3's own checkpoint with a run's LoRA merged, and the decoder beside it.

    sam3-vessel export --run runs/demo --out sam3_vessels.pt                  # a tiny run
    sam3-vessel export --run runs/angio --checkpoint sam3.pt --out sam3_vessels.pt

Writes OUT (loads with SAM 3's own builder) and OUT_head.pt (the decoder and views;
pipeline.export.load_exported joins them)."""

DATA_NEEDS = "--data takes a manifest CSV (`sam3-vessel data import` writes one) or `demo`"


def _leader() -> bool:
    """Whether this process speaks for all (rank 0 under torchrun, or no torchrun)."""
    return int(os.environ.get("RANK", "0")) == 0


def _parser(prog: str | None, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=description,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def _config(parser: argparse.ArgumentParser, cls, args: argparse.Namespace):
    """The validated config of `args` (contradictions end as argparse's usage errors, exit 2)."""
    try:
        return from_arguments(cls, args)
    except ValueError as err:
        parser.error(str(err))


def check_sources(args: argparse.Namespace) -> None:
    """The paths both stages read, found before any model work: --data (unless `demo` or a
    resumed run's own), --checkpoint, --adapter, --resume, and --cache when it is a path."""
    resume = getattr(args, "resume", None)
    if resume:
        check_run(resume, flag="--resume", files=())
    elif args.data != "demo":
        check_path(args.data, flag="--data", what="manifest", needs=DATA_NEEDS)
    if args.checkpoint:
        check_path(args.checkpoint, flag="--checkpoint", what="checkpoint file")
    if args.adapter:
        check_path(args.adapter, flag="--adapter", kind="folder", what="adapter folder")
    cache = getattr(args, "cache", None)
    if cache and (cache.endswith(".zarr") or os.sep in cache):
        check_path(cache, flag="--cache", kind="folder", what="cache")


def _demo_note(data: str, cache_dir: str) -> None:
    """Say where `--data demo` lives (made on first use)."""
    if data == "demo":
        from pipeline.data.demo import data_manifest

        manifest = data_manifest("demo", cache_dir)
        print(f"data: the synthetic demo set, {manifest.parent}{os.sep} (its manifest: "
              f"{manifest})", flush=True)


# --- extract ---------------------------------------------------------------------------------


def extract_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """`sam3-vessel extract` / `extract_features.py`; the exit status."""
    parser = _parser(prog, EXTRACT_HELP)
    add_arguments(parser, ExtractConfig)
    args = parser.parse_args(argv)
    return run_command(lambda: _extract(parser, args), resume="run the same command again: "
                       "images already in the cache are kept, the others are extracted")


def _extract(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    check_sources(args)
    config = _config(parser, ExtractConfig, args)
    from pipeline.data.checks import check_manifest
    from pipeline.data.demo import resolve_data
    from pipeline.extraction import run_extraction

    _demo_note(config.data, config.cache_dir)
    samples = resolve_data(config.data, config.cache_dir)
    copies_given = config.augment_copies is not None
    config = config.with_copies_for(samples)
    print(describe(config), flush=True)
    report = check_manifest(samples, require_masks=False)
    if report.warnings and report.ok:
        print(report.format(), flush=True)
    report.raise_if_errors()  # `error: manifest check: ...` with every problem, once
    summary = run_extraction(config, samples, report.keys)
    if _leader():
        print(f"cache {summary.cache_id} at {summary.path}")
        print(summary.line())
        print(f"next: train on it: {train_command(config, summary.cache_id, copies_given)}")
    return 0


def train_command(config: ExtractConfig, cache_id: str, copies_given: bool) -> str:
    """The `sam3-vessel train` command that trains on the cache `config` made: --cache reads
    its backbone, levels and amp; the copies are repeated when they were chosen by hand."""
    parts = ["sam3-vessel train", f"--data {config.data}", f"--cache {cache_id}"]
    if config.cache_dir != "cache":
        parts.append(f"--cache-dir {config.cache_dir}")
    if copies_given:
        parts.append(f"--augment-copies {config.augment_copies}")
    if config.augment_copies and config.augment != "random":
        parts.append(f"--augment {config.augment}")
    if config.augment_copies and config.augment_seed:
        parts.append(f"--augment-seed {config.augment_seed}")
    if config.device == "cpu":
        parts.append("--device cpu")
    return " ".join(parts)


# --- train -----------------------------------------------------------------------------------


def train_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """`sam3-vessel train` / `train_head.py`; the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser(prog, TRAIN_HELP)
    add_arguments(parser, TrainConfig)
    args = parser.parse_args(argv)
    given = given_fields(TrainConfig, argv)
    return run_command(lambda: _train(parser, args, given), resume=lambda: _resume_advice(args))


def _train(parser: argparse.ArgumentParser, args: argparse.Namespace, given: set[str]) -> int:
    check_sources(args)
    config = _config(parser, TrainConfig, args)
    from pipeline.train.launch import train

    if not config.resume and _leader():
        _demo_note(config.data, config.cache_dir)
    run_dir = train(config, given={name: getattr(config, name) for name in given})
    if _leader():
        print(next_after_training(run_dir), flush=True)
    return 0


def next_after_training(run_dir: Path) -> str:
    """The "what next" lines at the end of a training: predict, compare, export."""
    runs = run_dir.parent / "*"
    return (f"next: predict new images: sam3-vessel predict --run {run_dir} --data NEW.csv "
            f"--out {run_dir}-predictions\n"
            f"      compare runs:       sam3-vessel runs compare '{runs}'\n"
            f"      export for SAM 3:   sam3-vessel export --run {run_dir} --out "
            f"{run_dir.name}.pt")


def _resume_advice(args: argparse.Namespace) -> str:
    """How to continue: from the last checkpoint of the run directory, once there is one."""
    run_dir = args.resume or args.run_dir or "RUN_DIR (run_dir in the config printed at start)"
    return (f"continue with `sam3-vessel train --resume {run_dir}` (from its last checkpoint, "
            "last.pt; a run stopped before its first one starts again)")


# --- predict ---------------------------------------------------------------------------------


def predict_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """`sam3-vessel predict` / `python -m pipeline.predict`; the exit status."""
    parser = _parser(prog, PREDICT_HELP)
    parser.add_argument("--run", required=True, type=Path,
                        help="a run directory (what `sam3-vessel train` writes)")
    parser.add_argument("--data", required=True, type=Path, nargs="+",
                        help="a manifest CSV (image, view), `demo` (the synthetic set), or DICOM "
                        "runs: folders or files (`pipeline.predict_dicom`)")
    parser.add_argument("--out", required=True, type=Path, help="where the masks go")
    parser.add_argument("--device", default="auto",
                        help="cuda, cpu, or auto: cuda when there is a GPU (default: auto)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="images per forward pass (default: 8)")
    parser.add_argument("--loader-workers", type=int, default=2,
                        help="DataLoader processes decoding images (default: 2)")
    parser.add_argument("--overlays", type=int, default=6,
                        help="overlay PNGs of the first N rows in OUT/overlays (default: 6)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the prediction already in --out (only predict's files)")
    dicom = parser.add_argument_group("DICOM runs (see pipeline/predict_dicom.py)")
    dicom.add_argument("--frames", help="frames to predict, FIRST-LAST from 1 (default: all)")
    dicom.add_argument("--masks", type=Path, help="masks named as for `import dicom` "
                       "(<stem>_<frame>.png): their frames are scored")
    dicom.add_argument("--mask-regex", help="as `import dicom --mask-regex`")
    dicom.add_argument("--video", default="mp4", choices=("mp4", "gif", "none"),
                       help="review video per run (mp4 falls back to gif without PyAV)")
    args = parser.parse_args(argv)
    if args.device not in ("auto", "cuda", "cpu") and not args.device.startswith("cuda:"):
        parser.error(f"--device must be auto, cuda, cuda:N or cpu, not {args.device!r}")
    if args.batch_size < 1 or args.loader_workers < 0 or args.overlays < 0:
        parser.error("--batch-size must be >= 1, --loader-workers and --overlays >= 0")
    return run_command(lambda: _predict(args), resume="run the same command again (it writes "
                       "every mask again)")


def _predict(args: argparse.Namespace) -> int:
    check_run(args.run, flag="--run", files=("best.pt",))
    for data in args.data:
        if str(data) != "demo" and not data.is_dir():
            check_path(data, flag="--data", what="manifest or DICOM file",
                       needs="--data takes a manifest CSV, `demo`, or DICOM folders or files")
    if args.masks is not None:
        check_path(args.masks, flag="--masks", kind="folder", what="mask folder")
    dicom_only = [f"--{k.replace('_', '-')}" for k in ("frames", "masks", "mask_regex")
                  if getattr(args, k) is not None]
    from pipeline.predict_dicom import is_dicom_input, predict_runs

    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if is_dicom_input(args.data):
        runs = predict_runs(args.run, args.data, args.out, frames=args.frames,
                            masks_dir=args.masks, mask_regex=args.mask_regex,
                            device=device, batch_size=args.batch_size,
                            loader_workers=args.loader_workers, video=args.video)
        print(f"{len(runs)} run(s) in {args.out}: seg.dcm, review video and frames.csv each; "
              "runs.csv lists them")
        print(f"next: review {args.out}{os.sep}*{os.sep}review.mp4; sort frames.csv by a score "
              "to find the frames where the model lost the vessel")
        return 0
    if len(args.data) > 1 or dicom_only:
        raise UsageError(f"{' '.join(dicom_only) or 'several --data'}: for DICOM runs only "
                         "(a manifest is one CSV; its masks are its `mask` column)")
    from pipeline.predict import predict

    rows = predict(args.run, args.data[0], args.out, device=device,
                   batch_size=args.batch_size, loader_workers=args.loader_workers,
                   overlays=args.overlays, overwrite=args.overwrite)
    live = sum(r["features"] == "live" for r in rows)
    print(f"{len(rows)} masks in {args.out} ({len(rows) - live} from cached features, "
          f"{live} through the backbone)")
    print(f"next: look at {args.out / 'overlays'}{os.sep}; export the model for SAM 3: "
          f"sam3-vessel export --run {args.run} --out {args.run.name}.pt")
    return 0


# --- export ----------------------------------------------------------------------------------


def export_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """`sam3-vessel export` / `python -m pipeline.export`; the exit status."""
    parser = _parser(prog, EXPORT_HELP)
    parser.add_argument("--run", required=True, type=Path,
                        help="a run directory (what `sam3-vessel train` writes)")
    parser.add_argument("--checkpoint", type=Path,
                        help="the official sam3.pt the run trained on (default: the run's)")
    parser.add_argument("--out", required=True, type=Path,
                        help="the merged checkpoint to write; the head goes to <stem>_head.pt")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out (and its head) when they exist")
    args = parser.parse_args(argv)
    return run_command(lambda: _export(args), resume="run the same command again (the merged "
                       "checkpoint is written whole or not at all)")


def _export(args: argparse.Namespace) -> int:
    check_run(args.run, flag="--run", files=("best.pt", "adapter"))
    if args.checkpoint is not None:
        check_path(args.checkpoint, flag="--checkpoint", what="checkpoint file")
    from pipeline.export import export

    out, head = export(args.run, args.out, args.checkpoint, overwrite=args.overwrite)
    print(f"wrote {out} (SAM 3 checkpoint, LoRA merged) and {head} (decoder and views)")
    print(f"next: load both with pipeline.export.load_exported({str(out)!r}, {str(head)!r}), "
          "or the checkpoint alone with SAM 3's build_sam3_image_model(checkpoint_path=...)")
    return 0
