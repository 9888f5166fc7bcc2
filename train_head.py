"""Stage B: train the view-conditioned decoder (and the LoRA adapter) from cached features.

    python train_head.py --data demo --backbone tiny --steps 30            # the CPU demo
    python train_head.py --data manifest.csv --gpus 0,1 --e2e-every 5      # DDP on two GPUs
    python train_head.py --data manifest.csv --extract-missing --refresh-cache
    python train_head.py --resume runs/20261126-101500                     # continue a run
    python train_head.py --resume runs/20261126-101500 --steps 2000        # ... for longer
    torchrun --nnodes 2 --nproc-per-node 8 ... train_head.py --data manifest.csv

The same as the installed `sam3-vessel train` (which runs from any folder). Writes config.json,
metrics.jsonl, best.pt, last.pt, adapter/, report.json, curves.png and overlays/ into --run-dir
(default runs/<timestamp>). The recipe: `pipeline.cli.train_main` parses and checks the flags
(`pipeline.config.TrainConfig`), then `pipeline.train.launch.train` prepares the run (manifest,
cache, run directory) and runs the step loop in each process.
"""

import sys

from pipeline.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
