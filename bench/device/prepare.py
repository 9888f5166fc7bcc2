"""Inputs of the device smoke run: synthetic vessel images with masks and, for sam3, an
official-layout checkpoint of random weights (the real loading path, no download).

    python bench/device/prepare.py --work-dir /tmp/smoke --images 200 --image-side 1024 \
        --backbone sam3

Prints two lines, `manifest <path>` and `checkpoint <path or none>`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common as C  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--image-side", type=int, default=1024)
    parser.add_argument("--backbone", default="sam3")
    args = parser.parse_args()
    work = Path(args.work_dir)
    manifest = C.make_images(work / f"images-{args.images}-{args.image_side}", args.images,
                             args.image_side, workers=min(16, os.cpu_count() or 1))
    weights = C.weights_file(argparse.Namespace(checkpoint=None, backbone=args.backbone,
                                                work_dir=work))
    print(f"manifest {manifest}")
    print(f"checkpoint {weights or 'none'}")


if __name__ == "__main__":
    main()
