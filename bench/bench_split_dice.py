"""Validation Dice against minutes: frozen cache, periodic end to end, split cache, end to end.

    python -m pipeline.data import folder CHASEDB1/training/images ... --split train --out a.csv
    python bench/bench_split_dice.py --data chase.csv --block 1 --epochs 20   # tiny, CPU

Four real `train()` runs of the same head, seed and schedule on one manifest:

- frozen cache: the levels cache, no end-to-end epoch (LoRA never trains);
- periodic end to end: the levels cache with `--e2e-every E` (today's default 5);
- split cache: `--cache-block K --e2e-every 0` (LoRA in blocks after K at every step);
- end to end every step: `--e2e-every 1`.

Minutes count Stage A (the extraction of the run's cache, timed once per cache) and every epoch's
training and validation seconds from metrics.jsonl.
"""

from __future__ import annotations

import json
import shutil
import time

import _common as C

from pipeline.config import ExtractConfig, TrainConfig
from pipeline.data.manifest import read_manifest, sample_keys
from pipeline.extraction import run_extraction


def parse_args(argv=None):
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="manifest with train and val rows")
    parser.add_argument("--block", type=int, default=1, help="K of the split cache")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--e2e-every", type=int, default=5, help="of the periodic run")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--report-epochs", default="1,5,10,20")
    args = C.finish_args(parser.parse_args(argv))
    args.report_epochs = [int(e) for e in args.report_epochs.split(",")]
    return args


def runs(args) -> dict[str, dict]:
    return {"frozen cache": {"e2e_every": 0},
            f"periodic end to end (every {args.e2e_every})": {"e2e_every": args.e2e_every},
            f"split cache K={args.block}": {"e2e_every": 0, "cache_block": args.block},
            "end to end every step": {"e2e_every": 1}}


def extraction_minutes(args, cache_block: int | None) -> float:
    """Minutes of Stage A for the run's cache, into a fresh cache directory."""
    folder = args.work_dir / f"dice-cache-{cache_block}"
    shutil.rmtree(folder, ignore_errors=True)
    config = ExtractConfig(data=args.data, backbone=args.backbone, checkpoint=args.weights,
                           cache_dir=str(folder), cache_block=cache_block, device=args.device,
                           amp=args.amp, batch_size=args.batch_size, loader_workers=0)
    samples = read_manifest(args.data)
    start = time.perf_counter()
    run_extraction(config, samples, sample_keys(samples))
    return (time.perf_counter() - start) / 60


def one_run(args, name: str, overrides: dict) -> list[dict]:
    from pipeline.train.launch import train

    block = overrides.get("cache_block")
    run_dir = args.work_dir / ("dice-run-" + name.split(" (")[0].replace(" ", "-"))
    shutil.rmtree(run_dir, ignore_errors=True)
    config = TrainConfig(data=args.data, backbone=args.backbone, checkpoint=args.weights,
                         cache_dir=str(args.work_dir / f"dice-cache-{block}"), amp=args.amp,
                         device=args.device, epochs=args.epochs, batch_size=args.batch_size,
                         lr=args.lr, loader_workers=0, overlays=0, run_dir=str(run_dir),
                         **overrides)
    train(config)
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tables(args, results: dict[str, tuple[float, list[dict]]]) -> list[str]:
    summary, detail = [], []
    for name, (stage_a, records) in results.items():
        minutes, best, at = stage_a, 0.0, {}
        for r in records:
            minutes += r["seconds"] / 60
            if r["split"] == "val":
                best = max(best, r["dice"])
                at[r["epoch"]] = (r["dice"], minutes)
                if r["epoch"] in args.report_epochs:
                    detail.append([name, r["epoch"], r["dice"], minutes])
        last = max(at)
        summary.append([name, stage_a, at[last][1], at[last][0], best])
    return [
        C.table(f"Validation Dice against minutes ({args.epochs} epochs, batch "
                f"{args.batch_size}, lr {args.lr}, amp {args.amp})",
                ["run", "Stage A min", "total min", "last val Dice", "best val Dice"], summary),
        C.table("Validation Dice at some epochs (minutes so far, Stage A included)",
                ["run", "epoch", "val Dice", "minutes"], detail),
    ]


def main(argv=None) -> int:
    args = parse_args(argv)
    start_load = C.load_average()
    stage_a = {None: extraction_minutes(args, None),
               args.block: extraction_minutes(args, args.block)}
    results = {}
    for name, overrides in runs(args).items():
        records = one_run(args, name, overrides)
        results[name] = (stage_a[overrides.get("cache_block")], records)
    notes = [f"data: {args.data}; tiny is untrained (seeded random weights), so LoRA adapts a "
             "random trunk here; the ranking of runs by cost holds, the Dice levels do not carry "
             "over to sam3.",
             "periodic and every-step end-to-end runs validate through the live backbone once "
             "the adapter has moved (their cache is stale); frozen and split runs validate from "
             "the cache."]
    C.report("bench_split_dice", args, start_load, tables(args, results), notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
