"""Split cache (`--cache-block K`): work, time and peak memory of one training step; disk per image.

    python bench/bench_split.py                                             # tiny, seconds
    python bench/bench_split.py --backbone sam3 --random-weights --batch-size 1 --blocks 23,15

Modes, each the real `build_segmenter` model of `train_head.py` in train mode with activation
checkpointing (the default), one optimizer-free forward + backward of `dice_bce_loss`:

- cached, head only: 1x features from the cache into the decoder (LoRA gets no gradient);
- split K: the trunk's tokens after block K from the cache, blocks K+1.. (LoRA there only),
  the neck's 1x branch and the decoder;
- end to end: the image through the whole LoRA'd backbone (LoRA in every block).

FLOPs: `torch.utils.flop_counter` over one step of the same model moved to the meta device (the
exact shapes, nothing computed). Time and peak resident memory above the built model: real steps
on the CPU (or GPU memory on CUDA), each mode in a fresh process. Disk: the chunk file of one
sample per level, written by `FeatureCache` (codec none: raw float16 plus a 4-byte crc32c).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C
import numpy as np
import torch

from pipeline.config import TrainConfig
from pipeline.model.backbone import LEVELS, PRESETS, token_level


def parse_args(argv=None):
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--blocks", default="", help="split blocks K (default: the presets' "
                        "global blocks before the last)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per mode (last kept)")
    parser.add_argument("--step", help="(internal) MODE: one mode in this process")
    args = C.finish_args(parser.parse_args(argv))
    args.argv = list(sys.argv[1:] if argv is None else argv)
    preset = PRESETS[args.backbone]
    args.blocks = ([int(b) for b in args.blocks.split(",")] if args.blocks
                   else sorted(preset.global_blocks[:-1], reverse=True))
    return args


def modes(args) -> dict[str, tuple[int | None, bool]]:
    """mode -> (cache block or None, live backbone)."""
    out = {"cached, head only": (None, False)}
    out.update({f"split K={k}": (k, False) for k in args.blocks})
    out["end to end"] = (None, True)
    return out


def build(args, block: int | None):
    from pipeline.model.segmenter import build_segmenter

    config = TrainConfig(backbone=args.backbone, checkpoint=args.weights, cache_block=block,
                         e2e_every=0, amp=args.amp, device=args.device,
                         gpus=(0,) if args.device == "cuda" else ())
    return build_segmenter(config, num_views=4, use_angles=False).to(args.device).train()


def fake_batch(args, block: int | None, device) -> dict:
    preset, b = PRESETS[args.backbone], args.batch_size
    r = preset.resolution
    level = "1x" if block is None else token_level(block)
    return {"image": torch.randint(0, 256, (b, 3, r, r), dtype=torch.uint8, device=device),
            "mask": (torch.rand(b, 1, r, r, device=device) > 0.9).float(),
            "view": torch.zeros(b, dtype=torch.long, device=device),
            "angles": torch.zeros(b, 4, device=device),
            "features": {level: torch.randn(b, *preset.level_shape(level), device=device,
                                            dtype=torch.float16)}}


def step(model, batch: dict, live: bool) -> int:
    """One forward + backward; returns how many parameters got a gradient."""
    from pipeline.model.losses import dice_bce_loss

    try:
        dice_bce_loss(model(batch, live=live), batch["mask"]).backward()
        return sum(p.numel() for p in model.parameters() if p.grad is not None)
    finally:
        model.zero_grad(set_to_none=True)


def _status_kib(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines()
                if x.startswith(field + ":"))
    return int(line.split()[1])


def one_mode(args) -> None:
    """(Subprocess) one mode: time and memory of real steps, then FLOPs on the meta device;
    prints one JSON line."""
    from torch.utils.flop_counter import FlopCounterMode

    block, live = modes(args)[args.step]
    model = build(args, block)
    batch = fake_batch(args, block, args.device)
    seconds = []
    if args.device == "cuda":
        peak = C.gpu_peak(lambda: step(model, batch, live))
        seconds = [C.best_time(lambda: step(model, batch, live), repeat=args.steps,
                               device="cuda")]
        base = torch.cuda.memory_allocated() / 2**30
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        base_kib = _status_kib("VmRSS")
        for _ in range(args.steps):
            start = time.perf_counter()
            step(model, batch, live)
            seconds.append(time.perf_counter() - start)
        peak, base = (_status_kib("VmHWM") - base_kib) / 2**20, base_kib / 2**20
    model, batch = model.to("meta"), fake_batch(args, block, "meta")
    model.autocast = lambda device: contextlib.nullcontext()  # no autocast on meta
    with FlopCounterMode(display=False) as counter:
        trained = step(model, batch, live)
    print(json.dumps({"flops": counter.get_total_flops(), "seconds": seconds[-1],
                      "peak": peak, "model": base, "trained": trained}))


def steps_table(args) -> str:
    rows, notes = [], []
    reference = None
    for mode in modes(args):
        run = subprocess.run([sys.executable, __file__, *args.argv, "--step", mode],
                             capture_output=True, text=True)
        if run.returncode:
            tail = (run.stderr.strip().splitlines() or [""])[-1][:200] or (
                "killed by SIGKILL (on Linux usually the kernel's out-of-memory killer)"
                if run.returncode == -9 else "no message")
            rows.append([mode, f"failed (exit {run.returncode})", "", "", "", ""])
            notes.append(f"{mode}: {tail}")
            continue
        r = json.loads(run.stdout.strip().splitlines()[-1])
        reference = r if mode == "end to end" else reference
        rows.append([mode, r["flops"] / 1e12, r["seconds"], r["peak"], r["trained"] / 1e6,
                     r["model"]])
    if reference:
        for row in rows:
            if isinstance(row[1], float):
                row.insert(2, f"{100 * row[1] * 1e12 / reference['flops']:.1f} %")
    unit = "GPU GiB" if args.device == "cuda" else "GiB RSS above the model"
    return C.table(
        f"One training step, batch {args.batch_size}, amp {args.amp}, activation checkpointing "
        f"(FLOPs of forward + backward counted on the meta device; time: last of {args.steps})",
        ["mode", "TFLOP / step", "share of end to end", "s / step", f"peak {unit}",
         "M params with a gradient", "built model GiB"], rows) + "".join(f"\n- {n}" for n in notes)


def disk_table(args) -> str:
    from pipeline.cache.store import FeatureCache

    rows = []
    for name in sorted({args.backbone, "sam3"}):
        preset = PRESETS[name]
        levels = [*LEVELS, *[token_level(k) for k in preset.global_blocks[:-1]]]
        with tempfile.TemporaryDirectory() as folder:
            shapes = {lvl: preset.level_shape(lvl) for lvl in levels}
            cache = FeatureCache.create_or_open(folder, {"backbone": f"disk-{name}"}, shapes)
            cache.add_keys(["a"])
            rng = np.random.default_rng(0)
            cache.write_sample(0, {lvl: rng.standard_normal(s).astype(np.float16)
                                   for lvl, s in shapes.items()})
            for lvl, shape in shapes.items():
                size = cache._files(lvl).path(0).stat().st_size
                rows.append([name, lvl, "x".join(map(str, shape)), int(np.prod(shape)), size,
                             f"{size / 2**20:.2f}"])
    return C.table("Disk per image per level (one chunk file, codec none: float16 values + "
                   "4-byte crc32c)", ["backbone", "level", "shape", "values", "bytes",
                                      "MiB"], rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    if args.step:
        one_mode(args)
        return 0
    start_load = C.load_average()
    sections = [steps_table(args), disk_table(args)]
    notes = ["the end-to-end step runs the trunk in train mode: every block checkpointed, "
             "drop-path (rate up to 0.1) active; split steps do the same for blocks after K.",
             "random weights: time and FLOPs do not depend on the values; the features' "
             "compressibility does, so only codec none is shown."]
    C.report("bench_split", args, start_load, sections, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
