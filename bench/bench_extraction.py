"""Stage A throughput: the real extraction path against a bare loop of the backbone.

    python bench/bench_extraction.py                                  # CPU, tiny backbone
    python bench/bench_extraction.py --backbone sam3 --random-weights --device cuda \
        --batch-size 16 --images 256 --image-side 1024

Measures (1) images/s of `pipeline.extraction.run_extraction` into a fresh cache against a bare
loop of the same backbone call (`image_features` of --levels; SAM 3's `forward_image`, which
computes every level, for reference) on the same device, batch size and preprocessed inputs,
(2) bytes per image on disk per level and codec, (3) the time split of one worker (decode +
resize, host-to-device, forward, fp16+finite check, device-to-host, compress, store set, full
`write_sample`), (4) the CPU
time per image of the data path at 1008 px, (5) peak RSS for N and 2N images (subprocesses),
(6) images/s with 1 and 2 CPU worker processes and (7) on CUDA, peak GPU memory by batch size.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import _common as C
import numpy as np
import torch

from pipeline.cache.store import CODECS, DEFAULT_CODEC, FeatureCache
from pipeline.config import ExtractConfig
from pipeline.data.images import load_preprocessed, normalize, read_image, sam3_resize
from pipeline.data.manifest import read_manifest, sample_keys, write_manifest
from pipeline.extraction import run_extraction, stored_features
from pipeline.model.backbone import PRESETS, image_features

RSS_WRAPPER = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
               "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def parse_args(argv=None):
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="N images of the main run")
    parser.add_argument("--image-side", type=int, default=512, help="side of the source PNGs")
    parser.add_argument("--levels", default="1x,2x,4x")
    parser.add_argument("--codec", default=DEFAULT_CODEC, choices=sorted(CODECS))
    parser.add_argument("--loader-workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2,
                        help="interleaved rounds of bare and real runs; the best is kept")
    parser.add_argument("--budget-images", type=int, default=12,
                        help="1024 px PNGs decoded for the 1008 px data-path budget")
    parser.add_argument("--mem-batch-sizes", default="1,2,4,8,16,32", help="CUDA only")
    parser.add_argument("--skip", default="", help="comma list of: rss,workers,budget,gpu")
    parser.add_argument("--extract-only", help=argparse.SUPPRESS)  # the RSS subprocess
    args = C.finish_args(parser.parse_args(argv))
    args.levels = tuple(sorted(args.levels.split(",")))
    args.skip = set(filter(None, args.skip.split(",")))
    return args


def subset(manifest: Path, n: int) -> Path:
    """A manifest of the first n rows of `manifest`."""
    rows = [vars(s) for s in read_manifest(manifest)[:n]]
    return write_manifest(manifest.with_name(f"manifest-{n}.csv"), rows)


def config_for(args, manifest: Path, cache_dir: Path, **overrides) -> ExtractConfig:
    values = dict(data=str(manifest), backbone=args.backbone, checkpoint=args.weights,
                  cache_dir=str(cache_dir), levels=args.levels, amp=args.amp,
                  device=args.device, gpus=(0,) if args.device == "cuda" else (),
                  batch_size=args.batch_size, loader_workers=args.loader_workers,
                  codec=args.codec)
    return ExtractConfig(**{**values, **overrides})


@contextmanager
def forward_stamps(stamps: list):
    """Record when each backbone call (`pipeline.extraction.image_features`) of the in-process
    extraction worker starts; nothing is recorded in spawned workers."""
    import pipeline.extraction as extraction

    original = extraction.image_features

    def stamped(backbone, x, levels):
        stamps.append((time.perf_counter(), len(x)))
        return original(backbone, x, levels)

    extraction.image_features = stamped
    try:
        yield
    finally:
        extraction.image_features = original


def real_run(args, manifest: Path, keep: Path | None = None, **overrides) -> dict:
    """run_extraction of `manifest` into a fresh cache dir; `keep` receives the cache.

    "steady": images/s between the first and the last forward call (no start-up, no drain)."""
    cache_dir = Path(tempfile.mkdtemp(prefix="extract-", dir=args.work_dir))
    samples = read_manifest(manifest)
    keys = sample_keys(samples)
    stamps: list = []
    try:
        with C.Others() as others, forward_stamps(stamps):
            summary = run_extraction(config_for(args, manifest, cache_dir, **overrides),
                                     samples, keys)
        if keep is not None:
            shutil.rmtree(keep, ignore_errors=True)
            shutil.move(str(summary.path), keep)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    steady = (sum(n for _, n in stamps[:-1]) / (stamps[-1][0] - stamps[0][0])
              if len(stamps) > 2 else float("nan"))
    return {"n": summary.extracted, "seconds": summary.seconds, "steady": steady,
            "rate": summary.extracted / summary.seconds, "others": others.share}


def marginal(first: dict, second: dict) -> float:
    """images/s of the images the larger run adds: start-up and the last drain cancel out."""
    extra = second["seconds"] - first["seconds"]
    return (second["n"] - first["n"]) / extra if extra > 0 else float("nan")


def batches_of(args, paths: list, resolution: int) -> list[torch.Tensor]:
    images = [load_preprocessed(p, resolution) for p in paths]
    return [torch.stack(images[i : i + args.batch_size]).to(args.device)
            for i in range(0, len(images), args.batch_size)]


def bare_rate(args, backbone, batches, every_level: bool = False) -> tuple[float, float]:
    """images/s of the backbone alone over pre-loaded device batches (one pass): what
    extraction computes (`image_features` of --levels), or with `every_level` SAM 3's
    `forward_image`; and the share of the CPU other jobs used meanwhile."""
    def forward(batch):
        if every_level:
            return backbone.forward_image(batch)
        return image_features(backbone, batch, args.levels)

    with torch.inference_mode(), C.autocast(args.device, args.amp):
        forward(batches[0])  # warm-up
        C.sync(args.device)
        with C.Others() as others:
            start = time.perf_counter()
            for batch in batches:
                forward(batch)
            C.sync(args.device)
            seconds = time.perf_counter() - start
    return sum(len(b) for b in batches) / seconds, others.share


# ---------------------------------------------------------------- bytes on disk
def level_bytes(path: Path, levels) -> dict[str, int]:
    """Bytes of chunk files on disk per level (metadata excluded)."""
    return {lvl: sum(f.stat().st_size for f in (path / "features" / lvl).rglob("*")
                     if f.is_file() and f.name != "zarr.json") for lvl in levels}


def codec_bytes(args, cache: FeatureCache, n: int) -> dict[str, dict[str, float]]:
    """codec -> level -> bytes per image on disk, rewriting n cached samples with each codec."""
    import zarr

    values = {lvl: np.stack([cache.level(lvl)[i] for i in range(n)]) for lvl in args.levels}
    result = {}
    for codec in CODECS:
        folder = Path(tempfile.mkdtemp(prefix=f"codec-{codec}-", dir=args.work_dir))
        group = zarr.open_group(folder, mode="w")
        for lvl, v in values.items():
            array = group.create_array(lvl, shape=v.shape, chunks=(1, *v.shape[1:]),
                                       dtype="float16", compressors=CODECS[codec]())
            for i in range(n):
                array[i] = v[i]
        sizes = {lvl: sum(f.stat().st_size for f in (folder / lvl).rglob("*")
                          if f.is_file() and f.name != "zarr.json") / n for lvl in values}
        result[codec] = sizes
        shutil.rmtree(folder)
    return result


def bytes_table(args, cache_path: Path, n: int) -> str:
    cache = FeatureCache.open(cache_path)
    real = {lvl: b / n for lvl, b in level_bytes(cache_path, args.levels).items()}
    per_codec = codec_bytes(args, cache, min(n, 16))
    header = ["level", "shape", "raw B/img", f"cache ({args.codec}) B/img"]
    header += [f"{c} B/img (ratio)" for c in CODECS]
    rows = []
    for lvl in [*args.levels, "total"]:
        lvls = args.levels if lvl == "total" else (lvl,)
        raw = sum(int(np.prod(cache.level_shape(x))) * 2 for x in lvls)
        row = [lvl, "" if lvl == "total" else "x".join(map(str, cache.level_shape(lvl))),
               raw, round(sum(real[x] for x in lvls))]
        for codec in CODECS:
            size = sum(per_codec[codec][x] for x in lvls)
            row.append(f"{size:.0f} ({raw / size:.3f}x)")
        rows.append(row)
    return C.table("Bytes per image on disk (chunk files; codec columns rewrite 16 cached "
                   "samples)", header, rows)


# ---------------------------------------------------------------- time split
def store_set_seconds(folder: Path, encoded: list[bytes]) -> float:
    """Fewest seconds to `LocalStore.set` one image's encoded chunks (one object per level)."""
    import itertools

    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync
    from zarr.storage import LocalStore

    store, proto = LocalStore(folder), default_buffer_prototype()
    buffers = [proto.buffer.from_bytes(b) for b in encoded]
    counter = itertools.count()

    def put():
        i = next(counter)
        for j, buffer in enumerate(buffers):
            sync(store.set(f"s{i}/level{j}", buffer))

    return C.best_time(put, repeat=7)


def write_sample_seconds(args, sample: dict, repeat: int = 7) -> float:
    """Fewest seconds of `FeatureCache.write_sample` (the real write) in a fresh cache."""
    folder = Path(tempfile.mkdtemp(prefix="write-", dir=args.work_dir))
    shapes = {lvl: v.shape for lvl, v in sample.items()}
    cache = FeatureCache.create_or_open(folder, {"backbone": "bench", "n": 1}, shapes,
                                        codec=args.codec)
    cache.add_keys([f"k{i}" for i in range(repeat + 1)])
    rows = iter(range(repeat + 1))
    seconds = C.best_time(lambda: cache.write_sample(next(rows), sample), repeat=repeat)
    shutil.rmtree(folder)
    return seconds


def writes_table(args, sample: dict, bare: float) -> str:
    """Samples/s of `FeatureCache.write_sample` from 1, 2, 4, 8 threads (extraction's writer
    threads, `--writer-threads` default 4): can the writes keep up with the forward?"""
    import itertools
    from concurrent.futures import ThreadPoolExecutor

    folder = Path(tempfile.mkdtemp(prefix="writes-", dir=args.work_dir))
    shapes = {lvl: v.shape for lvl, v in sample.items()}
    cache = FeatureCache.create_or_open(folder, {"backbone": "bench", "n": 2}, shapes,
                                        codec=args.codec)
    per, threads = 24, (1, 2, 4, 8)
    cache.add_keys([f"k{i}" for i in range(per * len(threads) * 2)])
    rows, mb, out = itertools.count(), sum(v.nbytes for v in sample.values()) / 1e6, []
    for n in threads:
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(lambda _: cache.write_sample(next(rows), sample), range(n)))  # warm
            start = time.perf_counter()
            list(pool.map(lambda _: cache.write_sample(next(rows), sample), range(per)))
            rate = per / (time.perf_counter() - start)
        out.append([n, rate, rate * mb, rate / bare])
    shutil.rmtree(folder)
    return C.table(f"Writes by writer threads ({args.codec}, levels {','.join(args.levels)}, "
                   f"{mb:.2f} MB/image raw)", ["threads", "images/s", "MB/s raw",
                                               "images/s / bare forward images/s"], out)


def device_steps(args, backbone, paths: list) -> tuple[dict, dict]:
    """Per-image seconds of decode, H2D, normalise, forward, fp16+finite, D2H; and one host
    sample."""
    resolution, b, device = backbone.preset.resolution, args.batch_size, args.device
    transform = sam3_resize(resolution)  # as the extraction dataset holds it (uint8)
    decode = float(np.median([C.best_time(lambda p=p: transform(read_image(p)),
                                          repeat=3, warmup=0) for p in paths]))
    cpu_batch = torch.stack([transform(read_image(p)) for p in paths])
    if device == "cuda":
        cpu_batch = cpu_batch.pin_memory()
    on_device = cpu_batch.to(device)
    x = normalize(on_device)

    def forward():
        with torch.inference_mode(), C.autocast(device, args.amp):
            return image_features(backbone, x, args.levels)

    feats = forward()

    def post():
        half, finite = stored_features(feats)
        finite.tolist()
        return half

    half = post()
    host = {lvl: h.cpu().numpy() for lvl, h in half.items()}
    times = {
        "decode + resize (CPU, per image)": decode,
        "host to device (uint8)": C.best_time(lambda: cpu_batch.to(device, non_blocking=True),
                                                device=device) / b,
        "normalize on the device": C.best_time(lambda: normalize(on_device),
                                               device=device) / b,
        f"backbone: image_features of {','.join(args.levels)}": C.best_time(
            forward, repeat=3, device=device) / b,
        "fp16 cast + finite check (stored_features)": C.best_time(post, device=device) / b,
        "device to host (.cpu().numpy())": C.best_time(
            lambda: [h.cpu().numpy() for h in half.values()], device=device) / b,
        "per-sample arrays handed to the writers": C.best_time(
            lambda: [{lvl: np.ascontiguousarray(v[i]) for lvl, v in host.items()}
                     for i in range(len(x))]) / b,
    }
    return times, {lvl: np.ascontiguousarray(v[0]) for lvl, v in host.items()}


def split_tables(args, backbone, paths: list, bare: float) -> list[str]:
    times, sample = device_steps(args, backbone, paths[: args.batch_size])
    codec = C.numcodec(args.codec)
    encoded = [codec.encode(v) if codec else v.tobytes() for v in sample.values()]
    if codec:
        times[f"compress ({args.codec}, codec alone)"] = C.best_time(
            lambda: [codec.encode(v) for v in sample.values()], repeat=7)
    folder = Path(tempfile.mkdtemp(prefix="store-", dir=args.work_dir))
    times["store set (LocalStore, encoded bytes)"] = store_set_seconds(folder, encoded)
    shutil.rmtree(folder)
    parts = sum(times.values())
    rows = [[name, s * 1e3, f"{100 * s / parts:.1f} %"] for name, s in times.items()]
    whole = write_sample_seconds(args, sample)
    encode_and_set = sum(s for name, s in times.items() if name.startswith(("compress", "store")))
    rows += [["FeatureCache.write_sample (a whole write, for comparison)", whole * 1e3, ""],
             ["  of which not encode or store set (lookups, done flag, zarr)",
              (whole - encode_and_set) * 1e3, ""]]
    return [C.table(f"Time split of one worker, per image (batch {args.batch_size}, best of "
                    "repeats; writes run in writer threads, decode in loader processes)",
                    ["step", "ms / image", "share of the parts"], rows),
            writes_table(args, sample, bare)]


# ---------------------------------------------------------------- data-path budget at 1008 px
def budget_table(args, bare_1008: float | None) -> str:
    """Single-core CPU time per image: decode a 1024 px PNG, then sam3_resize(1008) (the
    loader's share of the preprocessing; normalisation runs on the device)."""
    from PIL import Image

    manifest = C.make_images(args.work_dir / f"images-1024px-{args.budget_images}",
                             args.budget_images, 1024)
    gray = [s.image for s in read_manifest(manifest)]
    rgb_dir = manifest.parent / "rgb"
    rgb_dir.mkdir(exist_ok=True)
    rgb = []
    for path in gray:
        target = rgb_dir / path.name
        if not target.is_file():
            g = np.asarray(Image.open(path), dtype=np.float32)
            Image.fromarray(np.stack([g, g * 0.86, g * 0.7], -1).astype(np.uint8)).save(target)
        rgb.append(target)
    transform, threads = sam3_resize(1008), torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    rows = []
    for kind, paths in (("gray 1024 px PNG", gray), ("RGB 1024 px PNG", rgb)):
        decode = cpu_seconds(lambda ps=paths: [read_image(p) for p in ps]) / len(paths)
        images = [read_image(p) for p in paths]
        resize = cpu_seconds(lambda im=images: [transform(i) for i in im]) / len(paths)
        total = decode + resize
        need = f"{bare_1008 * total:.1f}" if bare_1008 else "n/a (not a 1008 px backbone)"
        rows.append([kind, decode * 1e3, resize * 1e3, total * 1e3, 1 / total, need])
    torch.set_num_threads(threads)
    return C.table("Data-path CPU time per image at 1008 px (one thread, process CPU time)",
                   ["input", "decode ms", "sam3_resize(1008) ms", "total ms",
                    "images/s per core", "cores to feed the bare forward rate"], rows)


def cpu_seconds(fn) -> float:
    fn()  # warm-up
    start = time.process_time()
    fn()
    return time.process_time() - start


# ---------------------------------------------------------------- RSS, CPU workers, GPU memory
def child_args(args) -> list[str]:
    out = ["--backbone", args.backbone, "--device", args.device, "--batch-size",
           str(args.batch_size), "--amp", args.amp, "--work-dir", str(args.work_dir),
           "--levels", ",".join(args.levels), "--codec", args.codec,
           "--loader-workers", str(args.loader_workers), "--no-append"]
    return out + (["--checkpoint", args.weights] if args.weights else [])


def peak_rss_mb(args, manifest: Path, env: dict | None = None) -> float:
    """Largest ru_maxrss (MiB) among a fresh extraction subprocess and its descendants."""
    import os

    command = [sys.executable, "-c", RSS_WRAPPER, sys.executable, __file__,
               "--extract-only", str(manifest), *child_args(args)]
    out = subprocess.run(command, check=True, capture_output=True, text=True,
                         env={**os.environ, **(env or {})}).stdout
    return int(out.split()[-1]) / 1024


def rss_table(args, manifest_n: Path, manifest_2n: Path) -> str:
    """Peak RSS for N and 2N, with glibc's default malloc and with a fixed mmap threshold
    (large buffers then always go back to the OS: growth left is data, not the allocator)."""
    fixed = {"MALLOC_MMAP_THRESHOLD_": "131072"}
    rows = [[n, peak_rss_mb(args, m), peak_rss_mb(args, m, fixed)]
            for n, m in ((args.images, manifest_n), (2 * args.images, manifest_2n))]
    rows.append(["2N - N", rows[1][1] - rows[0][1], rows[1][2] - rows[0][2]])
    return C.table("Peak RSS of an extraction run, MiB (subprocess; RUSAGE_CHILDREN ru_maxrss "
                   "is that of the largest process)",
                   ["images", "default malloc", "MALLOC_MMAP_THRESHOLD_=131072"], rows)


def workers_table(args, manifests: tuple[Path, Path], one_worker: tuple[dict, dict]) -> str:
    """images/s with 1 and 2 worker processes: whole runs, marginal (N -> 2N), start-up."""
    rows = []
    for workers in (1, 2):
        runs = one_worker if workers == 1 else best_runs(args, manifests, workers=workers)[:2]
        rate = marginal(*runs)
        rows.append([workers, runs[0]["seconds"], runs[1]["seconds"], runs[1]["rate"], rate,
                     runs[0]["seconds"] - runs[0]["n"] / rate,
                     C.share(max(r["others"] for r in runs))])
    n = one_worker[0]["n"]
    return C.table(f"CPU worker processes (--workers; each with its own loader processes); best "
                   f"of {args.rounds} rounds", ["workers", f"seconds for {n}",
                                                f"seconds for {2 * n}",
                                                f"images/s whole run ({2 * n})",
                                                "images/s marginal (N -> 2N)",
                                                "start-up s (t(N) - N / marginal)",
                                                "others' CPU share (max)"], rows)


def gpu_table(args, backbone) -> str:
    if args.device != "cuda":
        return "**Peak GPU memory by batch size**: skipped (CPU run; needs --device cuda).\n"
    resolution, weights = backbone.preset.resolution, torch.cuda.memory_allocated() / 2**30
    rows = []
    for b in [int(x) for x in args.mem_batch_sizes.split(",")]:
        x = torch.randn(b, 3, resolution, resolution, device="cuda")

        def step(x=x):
            with torch.inference_mode(), C.autocast("cuda", args.amp):
                stored_features(image_features(backbone, x, args.levels))

        peak = C.gpu_peak(step)
        rows.append([b, peak, peak - weights])
        del x
        if peak == float("inf"):
            break
    return C.table(f"Peak GPU memory of extraction by batch size (weights {weights:.2f} GiB; "
                   "inf = out of memory)", ["batch", "peak GiB", "peak - weights GiB"], rows)


# ---------------------------------------------------------------- main
def best_runs(args, manifests: tuple[Path, Path], keep: Path | None = None, bare=None,
              **overrides) -> tuple[dict, dict, list]:
    """`--rounds` rounds of (bare pass, real run of N, real run of 2N): the fastest real runs
    and every bare rate (plus one more bare pass after the last round)."""
    bares, runs = [], ([], [])
    for r in range(args.rounds):
        if bare:
            bares.append(bare())
        runs[0].append(real_run(args, manifests[0], keep if r == 0 else None, **overrides))
        runs[1].append(real_run(args, manifests[1], **overrides))
    if bare:
        bares.append(bare())
    fastest = [min(rs, key=lambda x: x["seconds"]) for rs in runs]
    return fastest[0], fastest[1], bares


def throughput_table(args, backbone, manifests: tuple[Path, Path], keep: Path):
    """Best of `--rounds` interleaved bare passes and real runs of N and 2N (shared machines
    change speed within seconds). Returns the table, the bare images/s and the real runs."""
    paths = [s.image for s in read_manifest(manifests[0])]
    batches = batches_of(args, paths, backbone.preset.resolution)
    run_n, run_2n, bares = best_runs(args, manifests, keep,
                                     bare=lambda: bare_rate(args, backbone, batches))
    bare, steady, n = max(b for b, _ in bares), marginal(run_n, run_2n), run_n["n"]
    every = ", ".join(f"{b:.3g} @{C.share(o)}" for b, o in bares)
    full, full_others = bare_rate(args, backbone, batches, every_level=True)
    rows = [[f"bare loop of image_features({','.join(args.levels)}) (best; every pass @ others' "
             "CPU)", f"{bare:.4g} ({every})", 1.0, ""],
            ["bare loop of SAM 3's forward_image (every level; for reference)", full,
             full / bare, C.share(full_others)],
            [f"run_extraction, whole run of {n} (signature, model build, loader start)",
             run_n["rate"], run_n["rate"] / bare, C.share(run_n["others"])],
            [f"run_extraction, whole run of {2 * n}", run_2n["rate"], run_2n["rate"] / bare,
             C.share(run_2n["others"])],
            [f"run_extraction, marginal: {n} / (t({2 * n}) - t({n}))", steady, steady / bare,
             ""],
            [f"run_extraction, steady: first to last forward call of the {2 * n} run",
             run_2n["steady"], run_2n["steady"] / bare, ""]]
    title = (f"Extraction throughput, images of {args.image_side} px, levels "
             f"{','.join(args.levels)}, codec {args.codec}, loader_workers {args.loader_workers};"
             f" best of {args.rounds} rounds")
    header = ["path", "images/s", "ratio to bare (target >= 0.9)", "others' CPU share"]
    return C.table(title, header, rows), bare, (run_n, run_2n)


def notes(args) -> list[str]:
    out = []
    if args.backbone == "tiny":
        out.append("tiny backbone (embed 64, depth 4, 252 px), seeded random weights: the "
                   "forward is cheap, so decode and write costs weigh far more than with sam3.")
    elif args.random_weights:
        out.append("sam3 architecture with random weights (no checkpoint): speed and memory "
                   "are those of the real model; bytes/compression ratios are not.")
    if args.device == "cpu":
        out.append("CPU: decode processes, writer threads and the forward share the same "
                   "cores, so the ratio also prices decode and compression CPU time.")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.extract_only:
        real_run(args, Path(args.extract_only))
        return 0
    start_load = C.load_average()
    n, side = args.images, args.image_side
    manifest_2n = C.make_images(args.work_dir / f"images-{side}px-{2 * n}", 2 * n, side)
    manifest_n = subset(manifest_2n, n)
    backbone = C.load_backbone(args)
    keep = args.work_dir / "last-extraction.zarr"
    section, bare, runs = throughput_table(args, backbone, (manifest_n, manifest_2n), keep)
    paths = [s.image for s in read_manifest(manifest_n)]
    sections = [section, bytes_table(args, keep, n), *split_tables(args, backbone, paths, bare)]
    if "budget" not in args.skip:
        resolution = PRESETS[args.backbone].resolution
        sections.append(budget_table(args, bare if resolution == 1008 else None))
    if "rss" not in args.skip:
        sections.append(rss_table(args, manifest_n, manifest_2n))
    if "workers" not in args.skip and args.device == "cpu":
        sections.append(workers_table(args, (manifest_n, manifest_2n), runs))
    if "gpu" not in args.skip:
        sections.append(gpu_table(args, backbone))
    C.report("bench_extraction", args, start_load, sections, notes(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
