"""What durability costs: chunk writes with and without fsync, and sha256 throughput.

    python bench/bench_durability.py --dir /path/on/the/cache/disk --samples 40

Writes `--samples` chunks of sam3's 1x level (256 x 72 x 72 float16, 2.65 MB) and of the tiny
backbone's (256 x 18 x 18, 166 KB) through `ChunkFiles.write`, as extraction does, once as
shipped (data fsync, rename, folder fsync) and once with fsync disabled; then hashes a file of
`--hash-mb` MB as `checkpoint_digest` does and extrapolates to sam3.pt's 3.4 GB. With
`--extract`, also times whole extractions of the demo set (tiny backbone, CPU) both ways.
"""

import argparse
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pipeline.cache.store import ChunkFiles
from pipeline.data.manifest import file_sha256


def _write_rate(folder: Path, shape, samples: int, durable: bool, threads: int) -> float:
    """Wall ms per chunk with `threads` writer threads (extraction's --writer-threads)."""
    files = ChunkFiles(folder, shape, np.dtype("float16"), None, True)
    value = np.random.default_rng(0).standard_normal(shape).astype(np.float16)
    real = os.fsync
    if not durable:
        os.fsync = lambda fd: None
    try:
        start = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda row: files.write(row, value), range(samples)))
        return (time.perf_counter() - start) / samples * 1e3
    finally:
        os.fsync = real


def _extraction_seconds(folder: Path, durable: bool, repeat: int) -> float:
    """Wall seconds of a whole Stage A run over the demo set into a fresh cache."""
    from pipeline.config import ExtractConfig
    from pipeline.data.demo import resolve_data
    from pipeline.data.manifest import sample_keys
    from pipeline.extraction import run_extraction

    samples = resolve_data("demo", folder / "demo")
    keys = sample_keys(samples)
    config = ExtractConfig(data="demo", backbone="tiny", device="cpu", loader_workers=1,
                           cache_dir=str(folder / f"c{durable}{repeat}"))
    real = os.fsync
    if not durable:
        os.fsync = lambda fd: None
    try:
        return run_extraction(config, samples, keys).seconds
    finally:
        os.fsync = real


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", default=None, help="a folder on the disk to measure")
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--hash-mb", type=int, default=512)
    parser.add_argument("--extract", action="store_true", help="also time whole extractions")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for name, shape in (("sam3 1x", (256, 72, 72)), ("tiny 1x", (256, 18, 18))):
            for threads in (1, 4):
                for durable in (False, True):
                    ms = _write_rate(Path(tmp) / f"{name}-{durable}-{threads}", shape,
                                     args.samples, durable, threads)
                    print(f"{name}, {threads} writer thread(s): {ms:.2f} ms per chunk "
                          f"{'with' if durable else 'without'} fsync")
        blob = Path(tmp) / "blob"
        with blob.open("wb") as handle:
            for _ in range(args.hash_mb):
                handle.write(os.urandom(1 << 20))
        start = time.perf_counter()
        file_sha256(blob)
        rate = args.hash_mb / (time.perf_counter() - start)
        print(f"sha256: {rate:.0f} MB/s; 3.4 GB (sam3.pt): {3400 / rate:.1f} s")
        if args.extract:
            for repeat, durable in enumerate((False, True, False, True)):
                seconds = _extraction_seconds(Path(tmp), durable, repeat)
                print(f"demo extraction (96 images, tiny, cpu): {seconds:.1f} s "
                      f"{'with' if durable else 'without'} fsync")


if __name__ == "__main__":
    main()
