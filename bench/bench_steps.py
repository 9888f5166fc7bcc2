"""Stage B on a small real set: seconds per cached training step, and the share of wall time
spent outside forward, backward and the optimizer (start-up, decoding, waiting for data,
validation, scoring, checkpoints).

    python bench/bench_steps.py --data chase.csv                        # this tree
    python bench/bench_steps.py --data chase.csv --before /tmp/old-tree # and an older tree

Each tree runs in its own process: `pipeline.train.launch.train` (the real loop) for `--steps`
cached steps (tiny backbone, CPU, default batch, no end-to-end steps), with timers around the
segmenter's training forward, `Tensor.backward` and `AdamW.step`. A tree whose TrainConfig has no
`steps` field (the epoch loop) gets `--epochs` of one step each (the set must fit one batch).
The features must already be extracted (`extract_features.py --data ... --backbone tiny`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def measure(data: str, steps: int, cache_dir: str) -> dict:
    """One run in this process; the timings as a dict."""
    import dataclasses

    import torch

    from pipeline.config import TrainConfig
    from pipeline.model.segmenter import VesselSegmenter
    from pipeline.train.launch import train

    clock, lock = {"compute": 0.0}, threading.Lock()

    def timed(function, only_training=False):
        def wrapper(self, *args, **kwargs):
            if only_training and not self.training:
                return function(self, *args, **kwargs)
            start = time.perf_counter()
            try:
                return function(self, *args, **kwargs)
            finally:
                with lock:
                    clock["compute"] += time.perf_counter() - start
        return wrapper

    VesselSegmenter.forward = timed(VesselSegmenter.forward, only_training=True)
    torch.Tensor.backward = timed(torch.Tensor.backward)
    torch.optim.AdamW.step = timed(torch.optim.AdamW.step)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    budget = {"steps": steps} if "steps" in fields else {"epochs": steps}
    with tempfile.TemporaryDirectory() as run_dir:
        config = TrainConfig(data=data, backbone="tiny", device="cpu", cache_dir=cache_dir,
                             run_dir=run_dir, e2e_every=0, overlays=0, **budget)
        start = time.perf_counter()
        train(config)
        wall = time.perf_counter() - start
        records = [json.loads(x) for x in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
    train_s = sum(r["seconds"] for r in records if r["split"] == "train")
    done = max(r.get("step", r.get("epoch", 0)) for r in records)
    return {"steps": done, "wall_s": wall, "train_loop_s": train_s,
            "compute_s": clock["compute"], "loader_workers": config.loader_workers,
            "batch_size": config.batch_size}


def _run_tree(tree: Path, args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, __file__, "--data", args.data, "--steps",
                          str(args.steps), "--cache-dir", args.cache_dir, "--child"],
                         env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{tree}: the run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _row(label: str, r: dict) -> str:
    per_step, outside = r["wall_s"] / r["steps"], 1 - r["compute_s"] / r["wall_s"]
    loop_outside = 1 - r["compute_s"] / r["train_loop_s"]
    return (f"| {label} | {r['steps']} | {per_step:.2f} | {r['compute_s'] / r['steps']:.2f} | "
            f"{100 * outside:.1f} % | {100 * loop_outside:.1f} % |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a manifest whose training rows fit a batch")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cache-dir", default="cache")
    parser.add_argument("--before", help="an older source tree to measure as well")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.data, args.cache_dir = str(Path(args.data).resolve()), str(Path(args.cache_dir).resolve())
    if args.child:
        print(json.dumps(measure(args.data, args.steps, args.cache_dir)))
        return 0
    trees = ([("before", Path(args.before))] if args.before else []) + [
        ("after", Path(__file__).resolve().parents[1])]
    print("| tree | steps | wall s / step (whole run) | forward+backward+optimizer s / step | "
          "outside, whole run | outside, training loop only |")
    print("|---|---|---|---|---|---|")
    for label, tree in trees:
        print(_row(label, _run_tree(tree, args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
