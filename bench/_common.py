"""Shared helpers of the bench scripts: arguments, weights, synthetic data, timing, reporting.

The scripts are run by hand (`python bench/bench_*.py ...`), never by CI. Each prints its tables
and appends them, with the machine, the versions and the exact command, to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a bench never fetches anything
warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=FutureWarning)

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pipeline.model.backbone import PRESETS  # noqa: E402

BENCHMARKS = REPO / "BENCHMARKS.md"
AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


# ---------------------------------------------------------------- arguments
def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--backbone", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--checkpoint", help="an official-layout sam3.pt (real weights)")
    parser.add_argument("--random-weights", action="store_true",
                        help="with --backbone sam3: the full-size architecture with random "
                             "weights (written once as a checkpoint under --work-dir)")
    parser.add_argument("--amp", default="auto", help="bf16, fp16, off; auto: bf16 on cuda")
    parser.add_argument("--work-dir", default=str(REPO / "cache" / "bench"),
                        help="synthetic data, caches and runs of the bench (reused)")
    parser.add_argument("--no-append", action="store_true", help="print only")
    return parser


def finish_args(args: argparse.Namespace, *, needs_weights: bool = True) -> argparse.Namespace:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: this machine has no CUDA device")
    if args.amp == "auto":
        args.amp = "bf16" if args.device == "cuda" else "off"
    if needs_weights and args.backbone == "sam3" and not (args.checkpoint or args.random_weights):
        raise SystemExit("--backbone sam3 needs --checkpoint sam3.pt or --random-weights")
    args.work_dir = Path(args.work_dir)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    args.weights = weights_file(args) if needs_weights else None
    return args


def weights_file(args) -> str | None:
    """The checkpoint the real pipeline loads: given, random (sam3), or None (tiny)."""
    if args.checkpoint:
        return args.checkpoint
    if args.backbone != "sam3":
        return None  # tiny: seeded random weights built by pipeline.model.backbone itself
    path = args.work_dir / "sam3-random-weights.pt"
    if not path.is_file():
        from pipeline.model.backbone import _build_backbone, write_official_checkpoint

        print(f"writing random sam3 weights to {path} (once)", flush=True)
        torch.manual_seed(0)
        tmp = path.with_suffix(".tmp")
        write_official_checkpoint(_build_backbone(PRESETS["sam3"]), tmp)
        tmp.rename(path)
    return str(path)


def load_backbone(args):
    """The backbone in eval mode on args.device, with the weights the pipeline would load."""
    from pipeline.model.backbone import build_backbone

    return build_backbone(args.backbone, args.weights).to(args.device)


# ---------------------------------------------------------------- synthetic data
def make_images(folder: Path, n: int, side: int, *, seed: int = 0, workers: int = 1) -> Path:
    """n vessel-like PNGs (side x side, gray) with masks, 4 views, 3/4 train; manifest path.

    Rendered by the demo generator at 320 px, resized, with fresh fine noise so the PNGs are as
    hard to decode as real ones; `workers` processes render them. Reused when present.
    """
    from functools import partial
    from multiprocessing import get_context

    from pipeline.data.manifest import write_manifest

    manifest = folder / "manifest.csv"
    if manifest.is_file():
        return manifest
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    render = partial(_make_image, folder, side, seed)
    if workers > 1:
        with get_context("spawn").Pool(workers) as pool:
            rows = pool.map(render, range(n), chunksize=4)
    else:
        rows = [render(i) for i in range(n)]
    return write_manifest(manifest, rows)


def _make_image(folder: Path, side: int, seed: int, i: int) -> dict:
    """Image i of `make_images`: writes its PNG and mask; its manifest row."""
    from PIL import Image

    from pipeline.data.demo import VIEWS, render_sample

    views = [v for v in sorted(VIEWS) if VIEWS[v].tint is None]
    rng = np.random.default_rng([seed, i])
    view = views[i % len(views)]
    image, mask = render_sample(VIEWS[view], rng)
    image = np.asarray(Image.fromarray(image).resize((side, side), Image.BILINEAR), float)
    image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
    mask = Image.fromarray(mask).resize((side, side), Image.NEAREST)
    stem = f"{i:05d}.png"
    Image.fromarray(image).save(folder / "images" / stem)
    mask.save(folder / "masks" / stem)
    return {"image": folder / "images" / stem, "mask": folder / "masks" / stem,
            "view": view, "split": "val" if i % 4 == 3 else "train"}


# ---------------------------------------------------------------- timing
def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def best_time(fn, repeat: int = 5, warmup: int = 1, device="cpu") -> float:
    """Fewest seconds of `fn()` over `repeat` calls after `warmup` calls (the least disturbed
    by other jobs on a shared machine)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def _busy_seconds() -> float:
    """CPU seconds all processes of the machine have used (user+nice+system+irq+softirq+steal)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    import resource

    mine, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF,
                                                  resource.RUSAGE_CHILDREN))
    return mine.ru_utime + mine.ru_stime + kids.ru_utime + kids.ru_stime


class Others:
    """Share of the machine's CPU used by other jobs during the block (0 to 1): the noise level
    of a measurement on a shared machine (NaN for a block under 0.5 s). Our children count as
    ours once reaped."""

    def __enter__(self):
        self.start = (time.perf_counter(), _busy_seconds(), _own_seconds())
        return self

    def __exit__(self, *exc):
        wall, busy, own = (b - a for a, b in zip(self.start, (time.perf_counter(),
                                                              _busy_seconds(),
                                                              _own_seconds()), strict=True))
        # /proc/stat counts in ticks (10 ms): too coarse for a block shorter than ~0.5 s
        self.share = (max(0.0, busy - own) / (wall * (os.cpu_count() or 1)) if wall >= 0.5
                      else float("nan"))
        return False


def share(value: float) -> str:
    """An `Others.share` for a table: "12 %", or "-" when the block was too short to tell."""
    return "-" if value != value else f"{100 * value:.0f} %"


def autocast(device, amp: str):
    dtype = AMP[amp]
    return torch.autocast(torch.device(device).type, dtype=dtype or torch.float32,
                          enabled=dtype is not None)


def gpu_peak(fn) -> float:
    """Peak GiB of CUDA memory allocated while `fn()` runs ("OOM" raised as inf)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    failed = False
    try:
        fn()
        torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        failed = True  # free the traceback's tensors (outside the handler) before emptying
    if failed:
        torch.cuda.empty_cache()
        return float("inf")
    return torch.cuda.max_memory_allocated() / 2**30


def numcodec(codec: str):
    """The numcodecs codec doing the same compression as `pipeline.cache.store.CODECS[codec]` (or
    None), without the crc32c every chunk carries."""
    from zarr.codecs import Crc32cCodec

    from pipeline.cache.store import CODECS, FEATURE_DTYPE, numcodecs_compressor

    made = [c for c in CODECS[codec]() if not isinstance(c, Crc32cCodec)]
    if not made:
        return None
    (zarr_codec,) = made
    return numcodecs_compressor(zarr_codec, typesize=np.dtype(FEATURE_DTYPE).itemsize)


# ---------------------------------------------------------------- reporting
def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def uname() -> str:
    import subprocess

    try:
        return subprocess.run(["uname", "-a"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return " ".join(platform.uname())


def machine_lines(device: str) -> list[str]:
    from importlib.metadata import version

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                .splitlines() if line.startswith("model name")), platform.processor())
    gpu = torch.cuda.get_device_name() if device == "cuda" else "none used"
    versions = ", ".join(f"{name} {version(name)}" for name in
                         ("torch", "zarr", "numcodecs", "sam3", "numpy"))
    return [f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %z')}",
            f"- machine: `{uname()}`",
            f"- CPU: {cpu}, {os.cpu_count()} cores; GPU: {gpu}",
            f"- versions: {versions}, python {platform.python_version()}"]


def table(title: str, header: list[str], rows: list[list]) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return "inf" if value == float("inf") else f"{value:.4g}"
        return str(value)

    lines = [f"**{title}**", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def report(name: str, args, start_load: str, sections: list[str], notes: list[str]) -> None:
    """Print the tables; append them to BENCHMARKS.md with machine, versions and command."""
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO),
                                                            *sys.argv[1:]])
    text = "\n".join([
        f"## {name}: {args.backbone}, {args.device}, batch {args.batch_size}", "",
        *machine_lines(args.device),
        f"- load average (1/5/15 min) at start: {start_load}; at end: {load_average()}",
        f"- command: `{command}`", "",
        *sections,
        *(["Notes:", "", *[f"- {n}" for n in notes], ""] if notes else []),
    ])
    publish(text, append=not args.no_append)


def publish(text: str, *, append: bool) -> None:
    """Print a bench's section; append it to BENCHMARKS.md unless told not to."""
    print("\n" + text)
    if append:
        with BENCHMARKS.open("a") as handle:
            handle.write("\n" + text)
        print(f"appended to {BENCHMARKS}")
