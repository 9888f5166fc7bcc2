"""Stage B: train the view-conditioned decoder (and the LoRA adapter) from cached features.

    python train_head.py --data demo --backbone tiny --epochs 8            # the CPU demo
    python train_head.py --data manifest.csv --gpus 0,1 --e2e-every 5      # DDP on two GPUs
    python train_head.py --data manifest.csv --extract-missing --refresh-cache
    python train_head.py --resume runs/20261126-101500                     # continue a run
    python train_head.py --resume runs/20261126-101500 --epochs 40         # ... for longer
    torchrun --nnodes 2 --nproc-per-node 8 ... train_head.py --data manifest.csv

Writes config.json, metrics.jsonl, best.pt, last.pt, adapter/, report.json, curves.png and
overlays/ into --run-dir (default runs/<timestamp>).
"""

import argparse
import sys

from pipeline.config import TrainConfig, add_arguments, from_arguments, given_fields
from pipeline.errors import run_command
from pipeline.train.launch import train


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, TrainConfig)
    try:
        config = from_arguments(TrainConfig, parser.parse_args(argv))
    except ValueError as err:
        parser.error(str(err))
    given = given_fields(TrainConfig, argv if argv is not None else sys.argv[1:])
    return run_command(lambda: _train(config, given), resume=lambda: _resume_advice(config))


def _train(config: TrainConfig, given: set[str]) -> int:
    train(config, given={name: getattr(config, name) for name in given})
    return 0


def _resume_advice(config: TrainConfig) -> str:
    """How to continue: from the last checkpoint of the run directory, once there is one."""
    run_dir = config.resume or config.run_dir or "RUN_DIR (run_dir in the config printed at start)"
    return (f"continue with `python train_head.py --resume {run_dir}` (from its last "
            "checkpoint, last.pt; a run stopped before its first one starts again)")


if __name__ == "__main__":
    sys.exit(main())
