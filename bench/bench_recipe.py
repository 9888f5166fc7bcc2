"""Stage B recipes compared on one dataset: best val Dice, clDice (overall and per view), the step
it came at, and minutes, from each run's report.json and metrics.jsonl.

    python bench/bench_recipe.py --data chase.csv --steps 200 --batch-size 4 \
        "defaults=" "lr 1e-4=--lr 1e-4" "soft clDice=--loss dice_bce_cldice"
    python bench/bench_recipe.py --tabulate runs/a runs/b     # runs made before

Each recipe NAME=FLAGS runs `train_head.py --data DATA --backbone tiny --device cpu --steps S
--batch-size B FLAGS` in a fresh process under `--work-dir`; the features must be extracted
(`extract_features.py --data DATA --backbone tiny --device cpu`). Minutes are the run's wall
time, start-up and validation included (on a shared machine they say little about speed).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def summarise(run: Path, minutes: float | None = None) -> dict:
    """Best val Dice/clDice/AUC (overall, per view), its step, the last val Dice, minutes."""
    report = json.loads((run / "report.json").read_text())["val"]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["split"] == "val"]
    if minutes is None:  # the time inside the loop: training intervals and validations
        minutes = sum(r["seconds"] for r in records) / 60
    return {"run": str(run), "dice": report["dice"], "cldice": report["cldice"],
            "auc": report.get("auc", float("nan")),
            "step": report.get("step", report.get("epoch")), "last_dice": val[-1]["dice"],
            "per_view": {v: s["dice"] for v, s in report.get("per_view", {}).items()},
            "minutes": minutes}


def row(name: str, s: dict) -> str:
    views = ", ".join(f"{v} {d:.3f}" for v, d in sorted(s["per_view"].items()))
    return (f"| {name} | {s['dice']:.3f} | {s['cldice']:.3f} | {s['auc']:.3f} | {s['step']} | "
            f"{s['last_dice']:.3f} | {views} | {s['minutes']:.1f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", help="NAME=FLAGS")
    parser.add_argument("--data")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--work-dir", default="bench-recipe")
    parser.add_argument("--tabulate", nargs="*", default=[], help="existing run directories")
    args = parser.parse_args(argv)
    print("| recipe | best val Dice | its clDice | its AUC | at step | last val Dice | "
          "per view Dice | minutes |")
    print("|---|---|---|---|---|---|---|---|")
    for run in args.tabulate:
        print(row(Path(run).name, summarise(Path(run))), flush=True)
    for recipe in args.recipes:
        name, _, flags = recipe.partition("=")
        run = Path(args.work_dir) / name.replace(" ", "-")
        command = [sys.executable, str(REPO / "train_head.py"), "--data", args.data,
                   "--backbone", "tiny", "--device", "cpu", "--steps", str(args.steps),
                   "--batch-size", str(args.batch_size), "--run-dir", str(run),
                   *shlex.split(flags)]
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        print(row(name, summarise(run, (time.perf_counter() - start) / 60)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
