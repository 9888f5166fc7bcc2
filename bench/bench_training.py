"""Stage B: seconds per epoch from the cache against an end-to-end epoch, and the data wait.

    python bench/bench_training.py                                      # CPU, tiny backbone
    python bench/bench_training.py --backbone sam3 --random-weights --device cuda \
        --batch-size 16 --images 128 --image-side 1024

Runs `pipeline.train.launch.train` (the real loop, one process) with `--e2e-every E --epochs E`:
epochs 1..E-1 train from the cache and epoch E runs end to end through the LoRA'd backbone,
with the same head on the same device, once per `--loader-workers` value. Reads `seconds` and
`data_wait` from metrics.jsonl, and times `score_batch` (Dice and IoU of every training image,
clDice of the first `--train-cldice` per epoch, in scoring threads) inside the run. Also:
Stage B's per-sample CPU costs, and the peak memory and time of one training step by batch size,
cached and end to end with and without activation checkpointing (`--activation-checkpointing`):
GPU memory on CUDA; on the CPU the peak resident memory above the built model, each step in a
fresh process (for sam3: `--amp bf16 --mem-batch-sizes 1`, a few minutes per end-to-end step).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import _common as C
import numpy as np
import torch

from pipeline.config import TrainConfig
from pipeline.data.images import read_image, read_mask, sam3_resize
from pipeline.data.manifest import read_manifest
from pipeline.data.samples import resize_mask
from pipeline.model.backbone import PRESETS
from pipeline.train.metrics import score_batch

PARTS = ("epochs", "costs", "memory")
"""Parts of the bench that --skip can leave out."""


def parse_args(argv=None):
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="3/4 train, 1/4 val")
    parser.add_argument("--image-side", type=int, default=320, help="side of the source PNGs")
    parser.add_argument("--levels", default="1x")
    parser.add_argument("--epochs", type=int, default=3,
                        help="epochs per run; the last one is end to end")
    parser.add_argument("--loader-workers", default="0,2")
    parser.add_argument("--mem-batch-sizes", default="1,2,4,8,16")
    parser.add_argument("--skip", default="", help="comma list of: " + ",".join(PARTS))
    parser.add_argument("--step", help=argparse.SUPPRESS)  # MODE:BATCH, the CPU memory subprocess
    args = C.finish_args(parser.parse_args(argv))
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.levels = tuple(args.levels.split(","))
    args.loader_workers = [int(w) for w in args.loader_workers.split(",")]
    args.skip = set(filter(None, args.skip.split(",")))
    if args.skip - set(PARTS):
        parser.error(f"--skip: unknown {sorted(args.skip - set(PARTS))}; choose from {PARTS}")
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (cached epochs, then one end-to-end epoch)")
    return args


def train_config(args, manifest: Path, workers: int, run_dir: Path, **overrides) -> TrainConfig:
    values = dict(data=str(manifest), backbone=args.backbone, checkpoint=args.weights,
                  cache_dir=str(args.work_dir / "train-cache"), levels=args.levels,
                  amp=args.amp, extract_missing=True, epochs=args.epochs,
                  batch_size=args.batch_size, e2e_every=args.epochs, device=args.device,
                  gpus=(0,) if args.device == "cuda" else (), loader_workers=workers,
                  run_dir=str(run_dir), overlays=2,
                  memory_cache_mb=0)  # the loader-worker path this bench compares
    return TrainConfig(**{**values, **overrides})


@contextmanager
def metric_timer(spent: list):
    """Append, per training run_epoch call, the thread-seconds spent in `score_batch`."""
    import threading

    import pipeline.train.loop as trainer

    original_epoch, original_score = trainer.run_epoch, trainer.score_batch
    clock, lock = {"s": 0.0}, threading.Lock()

    def score(*a, **k):
        start = time.perf_counter()
        try:
            return original_score(*a, **k)
        finally:
            with lock:
                clock["s"] += time.perf_counter() - start

    def run_epoch(*a, **k):
        clock["s"] = 0.0
        result = original_epoch(*a, **k)
        if k.get("optimizer") is not None:
            spent.append(clock["s"])
        return result

    trainer.run_epoch, trainer.score_batch = run_epoch, score
    try:
        yield
    finally:
        trainer.run_epoch, trainer.score_batch = original_epoch, original_score


def train_run(args, manifest: Path, workers: int) -> list[dict]:
    """One real training run; its train records from metrics.jsonl, with `metrics_s` added."""
    from pipeline.train.launch import train

    run_dir = args.work_dir / f"run-w{workers}"
    shutil.rmtree(run_dir, ignore_errors=True)
    spent: list[float] = []
    with metric_timer(spent), C.Others() as others:
        train(train_config(args, manifest, workers, run_dir))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["split"] == "train"]
    for record, seconds in zip(train_records, spent, strict=True):
        record["metrics_s"], record["others"] = seconds, others.share
    shutil.rmtree(run_dir, ignore_errors=True)
    return train_records


# ---------------------------------------------------------------- epochs
def mean(values) -> float:
    return float(np.mean(values)) if values else float("nan")


def epochs_tables(args, runs: dict[int, list[dict]]) -> list[str]:
    detail, summary = [], []
    for workers, records in runs.items():
        for r in records:
            detail.append([workers, r["epoch"], "end to end" if r["e2e"] else "cached",
                           r["seconds"], r["samples_per_s"], f"{100 * r['data_wait']:.1f} %",
                           f"{100 * r['metrics_s'] / r['seconds']:.1f} %"])
        cached = [r for r in records if not r["e2e"]]
        steady = cached[1:] or cached  # the first epoch pays first-call costs
        e2e = [r for r in records if r["e2e"]]
        cached_s, e2e_s = mean([r["seconds"] for r in steady]), mean([r["seconds"] for r in e2e])
        summary.append([workers, cached_s, e2e_s, e2e_s / cached_s,
                        f"{100 * mean([r['data_wait'] for r in steady]):.1f} %",
                        f"{100 * mean([r['data_wait'] for r in e2e]):.1f} %",
                        C.share(records[0]["others"])])
    note = ("seconds, data_wait and samples/s from metrics.jsonl; metrics share = "
            "thread-seconds in score_batch (Dice and IoU of every training image, clDice of the "
            "first --train-cldice, in scoring threads beside the steps) / epoch seconds")
    return [
        C.table("Cached against end-to-end epochs (cached: mean of the epochs after the first)",
                ["loader_workers", "cached s/epoch", "end-to-end s/epoch",
                 "ratio e2e / cached", "data_wait cached (target < 5 %)", "data_wait e2e",
                 "others' CPU share (whole run)"],
                summary),
        C.table(f"Every training epoch ({note})",
                ["loader_workers", "epoch", "kind", "seconds", "samples/s", "data_wait",
                 "metrics share"], detail),
    ]


# ---------------------------------------------------------------- per-sample CPU costs
def costs_table(args, manifest: Path) -> str:
    """One-thread ms per sample of Stage B's non-feature work, at R and at 1008 px."""
    big = C.make_images(args.work_dir / "images-1024px-8", 8, 1024)
    resolution = PRESETS[args.backbone].resolution
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    rows = []
    for label, source, side in ((f"{args.image_side} px PNGs", manifest, resolution),
                                ("1024 px PNGs", big, 1008)):
        samples = read_manifest(source)[:8]
        masks = [read_mask(s.mask)[0] for s in samples]
        small = [resize_mask(m, side)[0].numpy() > 0.5 for m in masks]
        pred = [np.roll(m, 2, axis=1) for m in small]
        pieces = {
            "read_mask (decode, np.unique, threshold)": lambda ss=samples: [
                read_mask(s.mask) for s in ss],
            f"resize_mask to {side}": lambda ms=masks, r=side: [resize_mask(m, r) for m in ms],
            f"read_image + sam3_resize to {side} (uint8)": lambda ss=samples, r=side: [
                sam3_resize(r)(read_image(s.image)) for s in ss],
            f"score_batch at {side}, clDice too": lambda p=pred, t=small: (
                score_batch(np.stack(p), np.stack(t))),
            f"score_batch at {side}, Dice and IoU only": lambda p=pred, t=small: (
                score_batch(np.stack(p), np.stack(t), centrelines=0)),
        }
        for name, fn in pieces.items():
            rows.append([label, name, C.best_time(fn, repeat=3) / len(samples) * 1e3])
    torch.set_num_threads(threads)
    return C.table("Stage B per-sample CPU cost besides the features (one thread)",
                   ["source", "piece", "ms / sample"], rows)


# ---------------------------------------------------------------- GPU memory
def fake_batch(args, b: int, device: str = "cuda") -> dict:
    preset = PRESETS[args.backbone]
    r = preset.resolution
    return {"image": torch.randint(0, 256, (b, 3, r, r), dtype=torch.uint8, device=device),
            "mask": (torch.rand(b, 1, r, r, device=device) > 0.9).float(),
            "view": torch.zeros(b, dtype=torch.long, device=device),
            "angles": torch.zeros(b, 4, device=device),
            "features": {lvl: torch.randn(b, *preset.level_shape(lvl), device=device,
                                          dtype=torch.float16) for lvl in args.levels}}


def train_step(model, batch: dict, live: bool) -> None:
    from pipeline.model.losses import dice_bce_loss

    try:
        dice_bce_loss(model(batch, live=live), batch["mask"]).backward()
    finally:
        model.zero_grad(set_to_none=True)


MODES = {"cached": (False, True), "e2e, checkpointing": (True, True),
         "e2e, no checkpointing": (True, False)}
"""mode -> (live backbone, activation checkpointing)."""


def _status_kib(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines()
                if x.startswith(field + ":"))
    return int(line.split()[1])


def cpu_step(args, manifest: Path) -> None:
    """(Subprocess) Build the model, reset the peak RSS, run two training steps of one mode;
    print JSON: model GiB, peak GiB above it, seconds of the second step."""
    from pipeline.model.segmenter import build_segmenter

    mode, b = args.step.rsplit(":", 1)
    live, checkpointing = MODES[mode]
    config = train_config(args, manifest, 0, args.work_dir / "unused",
                          activation_checkpointing=checkpointing)
    model = build_segmenter(config, num_views=4, use_angles=False).train()
    batch = fake_batch(args, int(b), device="cpu")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base, seconds = _status_kib("VmRSS"), []
    for _ in range(2):
        start = time.perf_counter()
        train_step(model, batch, live)
        seconds.append(time.perf_counter() - start)
    print(json.dumps({"model": base / 2**20, "peak": (_status_kib("VmHWM") - base) / 2**20,
                      "seconds": seconds[-1]}))


def cpu_memory_table(args) -> str:
    rows, failed, model, notes = [], set(), float("nan"), []
    for b in [int(x) for x in args.mem_batch_sizes.split(",")]:
        row = [b]
        for mode in MODES:
            if mode in failed:  # a smaller batch already failed
                row += ["", ""]
                continue
            run = subprocess.run([sys.executable, __file__, *args.argv, "--step", f"{mode}:{b}"],
                                 capture_output=True, text=True)
            if run.returncode:  # e.g. killed by the kernel for memory (-9)
                failed.add(mode)
                row += [f"failed (exit {run.returncode})", ""]
                tail = (run.stderr.strip().splitlines() or [""])[-1][:200]
                notes.append(f"{mode}, batch {b}: exit {run.returncode} {tail}")
                continue
            result = json.loads(run.stdout.strip().splitlines()[-1])
            row += [result["peak"], result["seconds"]]
            model = result["model"]
        rows.append(row)
    header = ["batch"] + [f"{m} {x}" for m in MODES for x in ("GiB", "s/step")]
    return C.table(f"Peak resident memory above the built model ({model:.2f} GiB) and time of a "
                   f"training step on the CPU (forward + backward, amp {args.amp}, the second "
                   "of two steps, a fresh process each)", header, rows) + "".join(
                       f"\n- {n}" for n in notes)


def memory_table(args, manifest: Path) -> str:
    return gpu_memory_table(args, manifest) if args.device == "cuda" else cpu_memory_table(args)


def gpu_memory_table(args, manifest: Path) -> str:
    from pipeline.model.segmenter import build_segmenter

    config = train_config(args, manifest, 0, args.work_dir / "unused")
    model = build_segmenter(config, num_views=4, use_angles=False).to("cuda").train()
    trunk = model.backbone.get_base_model().vision_backbone.trunk
    weights = torch.cuda.memory_allocated() / 2**30
    rows, failed = [], set()
    for b in [int(x) for x in args.mem_batch_sizes.split(",")]:
        batch, row = fake_batch(args, b), [b]
        for mode, (live, checkpointing) in MODES.items():
            trunk.use_act_checkpoint = checkpointing
            if mode in failed:
                row += [float("inf"), ""]
                continue
            peak = C.gpu_peak(lambda lv=live, bt=batch: train_step(model, bt, lv))
            ms = "" if peak == float("inf") else 1e3 * C.best_time(
                lambda lv=live, bt=batch: train_step(model, bt, lv), repeat=3, device="cuda")
            failed |= {mode} if peak == float("inf") else set()
            row += [peak, ms]
        rows.append(row)
        del batch
    header = ["batch"] + [f"{m} {x}" for m in MODES for x in ("GiB", "ms/step")]
    return C.table(f"Peak GPU memory and time of a training step (forward + backward, amp "
                   f"{args.amp}; model {weights:.2f} GiB; inf = out of memory)", header, rows)


# ---------------------------------------------------------------- main
def notes(args) -> list[str]:
    out = ["the end-to-end epoch runs the backbone in train mode: LoRA on, SAM 3's ViT "
           "checkpoints each block (`--activation-checkpointing`, the default) and its "
           "drop-path (rate up to 0.1) is active."]
    if args.backbone == "tiny":
        out.append("tiny backbone: its trunk costs almost nothing, so an end-to-end epoch costs "
                   "about what a cached one does here; the ratio at full size is far larger "
                   "(compare the s/step columns of a `--backbone sam3` memory table).")
    if args.device == "cpu":
        out.append("CPU: loader processes compete with the training step for the same cores, "
                   "so loader_workers 2 can lower data_wait and still lengthen the epoch.")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    start_load = C.load_average()
    torch.manual_seed(0)
    side, n = args.image_side, args.images
    manifest = C.make_images(args.work_dir / f"images-{side}px-{n}", n, side)
    if args.step:
        cpu_step(args, manifest)
        return 0
    sections = []
    if "epochs" not in args.skip:
        runs = {workers: train_run(args, manifest, workers) for workers in args.loader_workers}
        sections += epochs_tables(args, runs)
    if "costs" not in args.skip:
        sections.append(costs_table(args, manifest))
    if "memory" not in args.skip:
        sections.append(memory_table(args, manifest))
    C.report("bench_training", args, start_load, sections, notes(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
