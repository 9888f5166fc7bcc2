"""The full-size SAM 3 backbone (random weights, official-layout checkpoint) through the real
commands on the CPU at batch 1, with the detail decoder: extraction, one cached step, one
end-to-end step, validation and a predict. Reports each command's time and peak memory (RSS),
so the GPU path of the detail decoder is not broken blind.

    python bench/bench_detail_sam3.py --backbone sam3 --random-weights --work-dir /tmp/detail-sam3
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402


def run(command: list[str]) -> tuple[float, float]:
    """Runs `command` (a pipeline command) to completion: (seconds, peak RSS GiB of it)."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, *command], cwd=C.REPO, capture_output=True,
                            text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}"
                         f"\n{result.stderr[-3000:]}")
    # ru_maxrss of the children: the largest child so far, in KiB.
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    return seconds, peak


def main() -> None:
    parser = C.base_parser(__doc__)
    parser.add_argument("--image-side", type=int, default=256)
    args = C.finish_args(parser.parse_args())
    args.batch_size = 1  # every command below runs at batch 1 (the report's title says so)
    start_load = C.load_average()
    manifest = C.make_images(args.work_dir / f"images-4-{args.image_side}", 4, args.image_side)
    common = ["--data", str(manifest), "--backbone", args.backbone, "--device", args.device,
              "--cache-dir", str(args.work_dir / "cache"), "--augment-copies", "0"]
    if args.weights:
        common += ["--checkpoint", args.weights]
    run_dir = args.work_dir / "run"
    rows = []
    for name, command in (
        ("extract (4 images)", ["extract_features.py", *common, "--batch-size", "1"]),
        ("train: 1 cached step, 1 end-to-end step, 2 validations",
         ["train_head.py", *common, "--batch-size", "1", "--steps", "2", "--val-every", "1",
          "--e2e-every", "2", "--probe-size", "1", "--loader-workers", "0", "--overlays", "1",
          "--run-dir", str(run_dir), "--overwrite"]),
        ("predict (4 images, through the LoRA'd backbone)",
         ["-m", "pipeline.predict", "--run", str(run_dir), "--data", str(manifest), "--out",
          str(args.work_dir / "predicted"), "--device", args.device, "--batch-size", "1",
          "--loader-workers", "0", "--overwrite"]),
    ):
        seconds, peak = run(command)
        rows.append([name, f"{seconds:.0f}", f"{peak:.2f}"])
        print(rows[-1], flush=True)
    C.report("Detail decoder on the full-size backbone (random weights)", args, start_load,
             [C.table("the real commands at batch 1", ["command", "seconds",
                                                       "peak RSS so far, GiB"], rows)],
             [f"{args.image_side} px images; the backbone sees them at its 1008 px; "
              "peak RSS is the largest of the commands run so far (getrusage of children)"])


if __name__ == "__main__":
    main()
