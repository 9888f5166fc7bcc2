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
from pipeline.errors import USER_ERRORS
from pipeline.train.setup import train


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, TrainConfig)
    try:
        config = from_arguments(TrainConfig, parser.parse_args(argv))
    except ValueError as err:
        parser.error(str(err))
    try:
        given = given_fields(TrainConfig, argv if argv is not None else sys.argv[1:])
        train(config, given={name: getattr(config, name) for name in given})
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
