"""Page faults and system time of a CPU training step, with and without huge pages.

    python bench/bench_page_faults.py --steps 5 --batch-size 16 --image-channels 16,32

Runs the decoder's training step (forward, Dice + BCE backward, AdamW) on random inputs of the
tiny backbone's shapes (1x level 256 x 18 x 18, image 3 x 252 x 252) in a fresh process once
with `THP_MEM_ALLOC_ENABLE=0` and once with `=1` (what `import pipeline` sets), one thread each,
and reports minor page faults, user and system CPU seconds and wall seconds per step, for each
width of the full-resolution image branch in `--image-channels`.
"""

import json
import os
import subprocess
import sys

from _common import base_parser, finish_args, load_average, report, table

CHILD = r"""
import json, resource, sys, time
import torch
from pipeline.model.losses import dice_bce_loss
from pipeline.model.decoder import ViewConditionedDecoder
steps, batch, channels = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)
torch.manual_seed(0)
decoder = ViewConditionedDecoder(levels=("1x",), num_views=1, image_channels=channels)
optimizer = torch.optim.AdamW(decoder.parameters(), lr=1e-3)
features = {"1x": torch.randn(batch, 256, 18, 18)}
image, view = torch.randn(batch, 3, 252, 252), torch.zeros(batch, dtype=torch.long)
mask = (torch.rand(batch, 1, 252, 252) > 0.9).float()
def step():
    loss = dice_bce_loss(decoder(features, view, image=image), mask)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
step()
before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in range(steps):
    step()
after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - start
print(json.dumps({"faults": (after.ru_minflt - before.ru_minflt) / steps,
                  "user": (after.ru_utime - before.ru_utime) / steps,
                  "system": (after.ru_stime - before.ru_stime) / steps, "wall": wall / steps}))
"""


def _measure(thp: str, steps: int, batch: int, channels: int) -> dict:
    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": thp, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, str(steps), str(batch), str(channels)],
                          env=env,
                          check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--image-channels", default="16,32")
    parser.set_defaults(batch_size=16)
    args = parser.parse_args()
    args.backbone, args.device = "tiny", "cpu"
    args = finish_args(args, needs_weights=False)
    start_load = load_average()
    rows = []
    for channels in [int(c) for c in args.image_channels.split(",")]:
        for thp in ("0", "1"):
            got = _measure(thp, args.steps, args.batch_size, channels)
            rows.append([channels, f"THP_MEM_ALLOC_ENABLE={thp}", f"{got['faults']:.0f}",
                         f"{got['user']:.3f}", f"{got['system']:.3f}", f"{got['wall']:.3f}"])
    section = table(f"One decoder training step, batch {args.batch_size}, one thread "
                    f"(mean of {args.steps} steps after one warm-up)",
                    ["image channels", "allocator", "minor page faults / step", "user s / step",
                     "system s / step", "wall s / step"], rows)
    report("bench_page_faults", args, start_load, [section],
           ["System and wall seconds depend on the machine's load (given above); the fault "
            "counts do not."])


if __name__ == "__main__":
    main()
