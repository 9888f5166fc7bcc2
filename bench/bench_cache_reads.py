"""Stage B's data path from the feature cache, and the codec study on real backbone outputs.

    python bench/bench_cache_reads.py                                   # CPU, tiny backbone
    python bench/bench_cache_reads.py --backbone sam3 --random-weights --device cuda \
        --batch-size 16 --images 96 --level-sets "1x;1x,2x"
    python bench/bench_cache_reads.py --backbone sam3 --synthetic-features --images 64 \
        --level-sets "1x" --codec none                    # sam3-sized chunks on any machine

(sam3 stores 2.65 MB per image at 1x, 10.6 MB at 2x and 42 MB at 4x, twice over: the cache and
the raw .npy copies under --work-dir.)

(1) samples/s and MB/s (decoded float16 bytes) through a DataLoader with 0, 1, 2 workers, for
features read in the loader's workers and for features read by `FeatureBatches` in the training
process (as Stage B reads them), alone and with Stage B's masks and images, against the DataLoader
alone and raw reads of the same bytes from a numpy memmap (same order, same collate; target ratio
>= 0.8); (2) what one
sample's read costs, piece by piece; (3) the codecs of `pipeline.cache.store.CODECS` on the cached
outputs: compression ratio, write and read MB/s through zarr, encode/decode MB/s alone.
All reads hit a warm page cache (the files were just written).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import _common as C
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from pipeline.cache.feature_batches import FeatureBatches
from pipeline.cache.store import CODECS, DEFAULT_CODEC, ChunkFiles, FeatureCache
from pipeline.config import ExtractConfig
from pipeline.data.images import normalize
from pipeline.data.manifest import read_manifest, sample_keys
from pipeline.data.samples import (
    SMALL_FIELDS,
    SegmentationSamples,
    ViewVocabulary,
    collate_samples,
)
from pipeline.extraction import run_extraction
from pipeline.model.backbone import PRESETS


def parse_args(argv=None):
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=192, help="samples in the cache")
    parser.add_argument("--image-side", type=int, default=320, help="side of the source PNGs")
    parser.add_argument("--codec", default=DEFAULT_CODEC, choices=sorted(CODECS),
                        help="codec of the cache the loaders read")
    parser.add_argument("--level-sets", default="1x;1x,2x,4x", help="';'-separated")
    parser.add_argument("--loader-workers", default="0,1,2")
    parser.add_argument("--codec-samples", type=int, default=64)
    parser.add_argument("--disk-mbps", type=float, default=500.0,
                        help="disk read MB/s assumed when the cache does not fit in RAM")
    parser.add_argument("--synthetic-features", action="store_true",
                        help="fill the cache with seeded random features of --backbone's level "
                             "shapes instead of running it: read speeds at sam3's chunk sizes "
                             "on a machine that cannot run sam3 (compression ratios of random "
                             "values mean nothing)")
    args = parser.parse_args(argv)
    args = C.finish_args(args, needs_weights=not args.synthetic_features)
    args.level_sets = [tuple(s.split(",")) for s in args.level_sets.split(";")]
    args.loader_workers = [int(w) for w in args.loader_workers.split(",")]
    return args


def build_cache(args) -> tuple[Path, list, np.ndarray]:
    """Extract the levels of `--level-sets` for N synthetic images (reused when present):
    the cache path, the samples and their rows."""
    side, n = args.image_side, args.images
    manifest = C.make_images(args.work_dir / f"images-{side}px-{n}", n, side)
    samples = read_manifest(manifest)
    keys = sample_keys(samples)
    config = ExtractConfig(data=str(manifest), backbone=args.backbone, checkpoint=args.weights,
                           cache_dir=str(args.work_dir / f"reads-{args.codec}"),
                           levels=tuple(sorted({lvl for ls in args.level_sets for lvl in ls})),
                           amp=args.amp, device=args.device,
                           gpus=(0,) if args.device == "cuda" else (),
                           batch_size=args.batch_size, codec=args.codec)
    if args.synthetic_features:
        return synthetic_cache(args, config.levels, samples, keys)
    summary = run_extraction(config, samples, keys)
    cache = FeatureCache.open(summary.path)
    return summary.path, samples, cache.rows_for(keys)


def synthetic_cache(args, levels, samples, keys) -> tuple[Path, list, np.ndarray]:
    """A cache with the layout, shapes and codec of a real one, filled with seeded N(0, 1)
    float16 values (written once, reused)."""
    preset = PRESETS[args.backbone]
    signature = {"backbone": f"synthetic-{preset.name}", "levels": list(levels),
                 "codec": args.codec}
    cache = FeatureCache.create_or_open(args.work_dir / "reads-synthetic", signature,
                                        {lvl: preset.level_shape(lvl) for lvl in levels},
                                        codec=args.codec)
    rows, done = cache.add_keys(keys), cache.done()
    rng = np.random.default_rng(0)
    for row in rows:
        if not done[row]:
            cache.write_sample(int(row), {lvl: rng.standard_normal(preset.level_shape(lvl),
                                                                   dtype=np.float32)
                                          .astype(np.float16) for lvl in levels})
    return cache.path, samples, rows


class FeatureRows(Dataset):
    """Features only: {level: (C, h, w) float16 tensor} from `FeatureCache.read`."""

    def __init__(self, path: Path, rows, levels):
        self.path, self.rows, self.levels, self._cache = path, rows, list(levels), None

    def __getstate__(self):
        return {**self.__dict__, "_cache": None}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        if self._cache is None:
            self._cache = FeatureCache.open(self.path)
        values = self._cache.read(int(self.rows[i]), self.levels)
        return {lvl: torch.from_numpy(v) for lvl, v in values.items()}


class ConstantRows(Dataset):
    """The DataLoader alone: the same {level: (C, h, w) float16} per sample, read from nowhere.
    Its rate with worker processes is the ceiling of shared-memory transfer to the trainer."""

    def __init__(self, n: int, shapes: dict[str, tuple]):
        self.n = n
        self.values = {lvl: torch.zeros(shape, dtype=torch.float16)
                       for lvl, shape in shapes.items()}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {lvl: v.clone() for lvl, v in self.values.items()}


class InWorkers(Dataset):
    """Stage B's samples with their features read in the loader's workers (so they cross to the
    trainer through shared memory), for comparison with `FeatureBatches`. `float_images`:
    normalise the image to float32 in the loader too (4 bytes per pixel and channel instead of
    the uint8 `SegmentationSamples` ships)."""

    def __init__(self, inputs: SegmentationSamples, features: FeatureRows,
                 float_images: bool = False):
        self.inputs, self.features, self.float_images = inputs, features, float_images

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> dict:
        item = {**self.inputs[i], "features": self.features[i]}
        if self.float_images:
            item["image"] = normalize(item["image"])
        return item


def memmaps(args, path: Path, levels) -> dict[str, np.ndarray]:
    """Each level of the cache as an uncompressed .npy, opened as a read-only memmap."""
    cache, out = FeatureCache.open(path), {}
    for lvl in levels:
        npy, array = path.parent / f"{path.name}-{lvl}.npy", cache.level(lvl)
        if not npy.is_file() or np.load(npy, mmap_mode="r").shape != array.shape:
            store = np.lib.format.open_memmap(npy, mode="w+", dtype=np.float16,
                                              shape=array.shape)
            for i in range(array.shape[0]):
                store[i] = array[i]
            store.flush()
            del store
        out[lvl] = np.load(npy, mmap_mode="r")
    return out


def order(n: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()


def raw_pass(maps: dict, rows, batch: int) -> tuple[float, float]:
    """Seconds to read every row of the memmaps (shuffled) into tensors and collate batches;
    and the share of the CPU other jobs used meanwhile."""
    idx = order(len(rows))
    with C.Others() as others:
        start = time.perf_counter()
        for b in range(0, len(idx), batch):
            default_collate([{lvl: torch.from_numpy(np.array(m[int(rows[i])]))
                              for lvl, m in maps.items()} for i in idx[b : b + batch]])
        seconds = time.perf_counter() - start
    return seconds, others.share


def loader_pass(dataset, workers: int, batch: int, pin: bool) -> tuple[float, float, float]:
    """(seconds of a whole pass incl. worker start, seconds to the first batch, others' CPU
    share), shuffled. A `Batched` dataset is wrapped as the trainer wraps it."""
    inner = dataset.dataset if isinstance(dataset, Batched) else dataset
    loader = DataLoader(inner, batch_size=batch, num_workers=workers, pin_memory=pin,
                        sampler=order(len(inner)), collate_fn=collate_samples)
    if isinstance(dataset, Batched):
        loader = dataset.wrap(loader, pin)
    with C.Others() as others:
        start, first = time.perf_counter(), None
        for _ in loader:
            first = first or time.perf_counter() - start
        seconds = time.perf_counter() - start
    return seconds, first, others.share


class Batched:
    """A dataset without features whose loader `FeatureBatches` wraps (as the trainer does)."""

    def __init__(self, dataset, path: Path, rows, levels, samples):
        self.dataset, self.path, self.rows, self.levels = dataset, path, rows, levels
        self.samples = samples

    def __len__(self) -> int:
        return len(self.dataset)

    def wrap(self, loader, pin: bool) -> FeatureBatches:
        return FeatureBatches(loader, cache_path=self.path, rows=np.asarray(self.rows)[:, None],
                              levels=tuple(self.levels), samples=self.samples, pin_memory=pin)


# ---------------------------------------------------------------- loaders against raw reads
def datasets_for(path: Path, samples: list, rows, levels, resolution: int) -> dict:
    views = ViewVocabulary.from_samples(samples)
    bare = SegmentationSamples(samples, resolution=resolution, views=views, with_image=False,
                               with_masks=False)
    full = SegmentationSamples(samples, resolution=resolution, views=views)
    features = FeatureRows(path, rows, levels)
    return {
        "features in the workers (FeatureCache.read per row)": features,
        "features in this process (FeatureBatches, as Stage B reads)": Batched(
            bare, path, rows, levels, samples),
        "features in the workers + masks + images": InWorkers(full, features),
        "the same, images normalised to float32 in the loader": InWorkers(
            full, features, float_images=True),
        "FeatureBatches + masks + images in the workers (Stage B)": Batched(
            full, path, rows, levels, samples),
    }


def loaders_table(args, path: Path, samples: list, rows) -> str:
    n, batch, pin = len(rows), args.batch_size, args.device == "cuda"
    resolution = PRESETS[args.backbone].resolution
    out = []
    for levels in args.level_sets:
        maps = memmaps(args, path, levels)
        mb = sum(int(np.prod(m.shape[1:])) * 2 for m in maps.values()) / 1e6
        raw_pass(maps, rows, batch)  # warm-up
        seconds, others = min(raw_pass(maps, rows, batch) for _ in range(7))
        raw = n / seconds
        out.append([",".join(levels), "raw memmap reads + collate (1 process)", "", raw,
                    raw, raw * mb, 1.0, "", "", C.share(others)])
        ceiling = {}
        constant = ConstantRows(n, {lvl: m.shape[1:] for lvl, m in maps.items()})
        readers = {"DataLoader alone (constant tensors, no reads)": constant,
                   **datasets_for(path, samples, rows, levels, resolution)}
        for name, dataset in readers.items():
            for workers in args.loader_workers:
                # Raw reads again just before: this machine's speed drifts within minutes.
                near = n / min(raw_pass(maps, rows, batch)[0] for _ in range(3))
                passes = [loader_pass(dataset, workers, batch, pin) for _ in range(3)]
                seconds, first, others = min(passes)
                rate, steady = n / seconds, (n - batch) / (seconds - first)
                ceiling.setdefault(workers, steady)
                out.append([",".join(levels), name, workers, rate, steady, steady * mb,
                            steady / near, steady / ceiling[workers], first * 1e3,
                            C.share(others)])
    return C.table(f"Stage B data path, {n} samples, batch {batch}, shuffled, warm page cache "
                   "(loaders: best of 3 passes, each with a new DataLoader as the trainer "
                   "makes; raw: best of 7)",
                   ["levels", "reader", "workers", "samples/s", "samples/s after the first batch",
                    "MB/s (features, after the first batch)", "ratio to raw reads timed just "
                    "before, after the first batch (target >= 0.8)", "ratio to DataLoader alone",
                    "first batch ms",
                    "others' CPU share"], out)


# ---------------------------------------------------------------- the small fields
class SmallFields(Dataset):
    """Only the four small fields of a `SegmentationSamples` item, as its tensors."""

    def __len__(self) -> int:
        return 4096

    def __getitem__(self, i: int) -> dict:
        return dict(zip(SMALL_FIELDS, (torch.tensor(i), torch.tensor(0), torch.tensor(1),
                                       torch.zeros(4)), strict=True))


def small_fields_table(args) -> str:
    """Per batch: wall ms and the trainer's CPU ms to receive the small fields from workers,
    as tensors (the default collate) and as numpy arrays (`collate_samples`); after the first
    batch, best of 3."""
    out = []
    for workers in (1, 2):
        for name, collate in (("tensors (default collate)", default_collate),
                              ("numpy arrays (collate_samples)", collate_samples)):
            best = None
            for _ in range(3):
                batches = iter(DataLoader(SmallFields(), batch_size=args.batch_size,
                                          num_workers=workers, collate_fn=collate))
                next(batches)
                cpu, start, n = time.process_time(), time.perf_counter(), 0
                for _ in batches:
                    n += 1
                run = ((time.perf_counter() - start) / n, (time.process_time() - cpu) / n)
                best = run if best is None or run < best else best
            out.append([workers, name, best[0] * 1e3, best[1] * 1e3])
    return C.table(f"Index, copy, view and angles of a batch of {args.batch_size} from loader "
                   "workers (nothing else in the batch)",
                   ["workers", "fields cross as", "ms per batch", "trainer CPU ms per batch"],
                   out)


# ---------------------------------------------------------------- one sample, piece by piece
def read_cost_table(args, path: Path, rows, levels) -> str:
    """ms per sample of each piece of `FeatureCache.read`, cycling over 16 rows."""
    cache = FeatureCache.open(path)
    arrays = {lvl: cache.level(lvl) for lvl in levels}
    codec = C.numcodec(cache.group.attrs["codec"])
    picks = [int(r) for r in rows[:16]]
    direct = {lvl: ChunkFiles.for_array(a) for lvl, a in arrays.items()}
    files = [[direct[lvl].path(r) for lvl in levels] for r in picks]
    # Each chunk ends with its 4-byte crc32c, which the compressor alone does not read.
    blobs = [[f.read_bytes()[:-4] for f in fs] for fs in files]
    maps = memmaps(args, path, levels)
    pieces = {
        "read the chunk files (Path.read_bytes)": lambda: [f.read_bytes() for fs in files
                                                            for f in fs],
        "decode alone (numcodecs)": lambda: [codec.decode(b) for bs in blobs for b in bs]
        if codec else None,
        "zarr Array[row], arrays opened once": lambda: [a[r] for r in picks
                                                        for a in arrays.values()],
        "ChunkFiles.read(row) (read + decode into a new array)": lambda: [
            f.read(r) for r in picks for f in direct.values()],
        "group['features/<level>'] lookups (FeatureCache.level)": lambda: [
            cache.level(lvl) for _ in picks for lvl in levels],
        "FeatureCache.read(row, levels)": lambda: [cache.read(r, list(levels)) for r in picks],
        "raw memmap copy": lambda: [np.array(m[r]) for r in picks for m in maps.values()],
    }
    out = [[name, C.best_time(fn, repeat=5) / len(picks) * 1e3] for name, fn in pieces.items()]
    return C.table(f"Cost of one sample's read, levels {','.join(levels)} (one process, "
                   f"codec {cache.group.attrs['codec']})", ["piece", "ms / sample"], out)


# ---------------------------------------------------------------- codec study
def codec_run(args, codec: str, values: dict[str, list]) -> dict:
    """Write then read `values` ({level: [sample (C, h, w)]}) in fresh zarr arrays of `codec`."""
    import zarr

    folder = Path(tempfile.mkdtemp(prefix=f"codec-{codec}-", dir=args.work_dir))
    group = zarr.open_group(folder, mode="w")
    arrays = {lvl: group.create_array(lvl, shape=(len(vs), *vs[0].shape),
                                      chunks=(1, *vs[0].shape), dtype="float16",
                                      compressors=CODECS[codec]()) for lvl, vs in values.items()}
    k = len(next(iter(values.values())))

    def write_all():
        for i in range(k):
            for lvl, array in arrays.items():
                array[i] = values[lvl][i]

    write = C.best_time(write_all, repeat=3, warmup=0)  # later passes overwrite the chunks
    read = C.best_time(lambda: [a[i] for i in range(k) for a in arrays.values()], repeat=5)
    files = [ChunkFiles.for_array(a) for a in arrays.values()]
    direct = C.best_time(lambda: [f.read(i) for i in range(k) for f in files], repeat=5)
    disk = {lvl: sum(f.stat().st_size for f in (folder / lvl).rglob("*")
                     if f.is_file() and f.name != "zarr.json") for lvl in values}
    shutil.rmtree(folder)
    return {"write": write, "read": read, "direct": direct, "disk": disk}


def codec_alone(codec: str, values: dict[str, list]) -> tuple[float, float]:
    """Seconds to encode and to decode every sample with the codec alone (0 for none)."""
    nc = C.numcodec(codec)
    if nc is None:
        return 0.0, 0.0
    flat = [v for vs in values.values() for v in vs]
    encoded = [nc.encode(v) for v in flat]
    return (C.best_time(lambda: [nc.encode(v) for v in flat], repeat=5),
            C.best_time(lambda: [nc.decode(e) for e in encoded], repeat=5))


def codec_table(args, path: Path) -> tuple[str, str]:
    cache = FeatureCache.open(path)
    k = min(args.codec_samples, cache.level("1x").shape[0])
    values = {lvl: [cache.level(lvl)[i] for i in range(k)] for lvl in cache.levels}
    raw = {lvl: sum(v.nbytes for v in vs) for lvl, vs in values.items()}
    total, out, effective, ratios, warm = sum(raw.values()), [], {}, {}, {}
    for codec in CODECS:
        run, (enc, dec) = codec_run(args, codec, values), codec_alone(codec, values)
        ratio = total / sum(run["disk"].values())
        read_mbps, direct_mbps = total / run["read"] / 1e6, total / run["direct"] / 1e6
        effective[codec], ratios[codec] = min(direct_mbps, args.disk_mbps * ratio), ratio
        warm[codec] = direct_mbps
        out.append([codec, *[f"{raw[lvl] / run['disk'][lvl]:.3f}" for lvl in values],
                    f"{ratio:.3f}", total / run["write"] / 1e6, read_mbps, direct_mbps,
                    total / enc / 1e6 if enc else "", total / dec / 1e6 if dec else "",
                    effective[codec]])
    # Within 5 % of the fastest cold read the smallest cache wins (it is read every epoch).
    close = [c for c in CODECS if effective[c] >= 0.95 * max(effective.values())]
    best = max(close, key=ratios.get), max(warm, key=warm.get)
    header = ["codec", *[f"ratio {lvl}" for lvl in values], "ratio all", "write MB/s (zarr)",
              "read MB/s (zarr)", "read MB/s (ChunkFiles, as Stage B reads)",
              "encode MB/s alone", "decode MB/s alone",
              f"read MB/s from a {args.disk_mbps:g} MB/s disk"]
    text = C.table(f"Codecs on {k} cached samples ({total / k / 1e6:.2f} MB each, all "
                   "levels); MB/s of decoded float16 bytes, one thread", header, out)
    return text, best


# ---------------------------------------------------------------- main
def notes(args, best: tuple[str, str]) -> list[str]:
    cold, warm = best
    out = [f"codec by the data: `{cold}` for a cache bigger than the page cache, read from a "
           f"{args.disk_mbps:g} MB/s disk (the highest compression ratio among the codecs "
           "within 5 % of the fastest min(ChunkFiles read MB/s, disk MB/s x ratio)); "
           f"`{warm}` for a cache that stays in the page cache (the fastest ChunkFiles read)."]
    if args.backbone == "tiny" or args.random_weights:
        out.append("the features are outputs of a random-weight backbone (tiny: seeded random "
                   "init): compression ratios of trained SAM 3 features may differ; rerun on a "
                   "cache of real features before changing the default.")
    out.append("MB/s counts decoded float16 feature bytes; ratios to raw compare each loader "
               "(after its first batch: worker start-up is in `samples/s` and `first batch "
               "ms`) with one process copying the same rows out of uncompressed .npy memmaps, "
               "best of 3 passes timed just before the loader's (the first row: best of 7 at "
               "the start).")
    out.append("`DataLoader alone` builds same-sized tensors in `__getitem__` without reading "
               "anything: with worker processes, its rate is what the transfer of batches "
               "through shared memory allows on this machine. `FeatureBatches` (Stage B) reads "
               "features in the training process, so only masks, images and indices cross.")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    start_load = C.load_average()
    torch.manual_seed(0)
    path, samples, rows = build_cache(args)
    sections = [loaders_table(args, path, samples, rows), small_fields_table(args)]
    sections += [read_cost_table(args, path, rows, levels) for levels in args.level_sets]
    codecs, best = codec_table(args, path)
    sections.append(codecs)
    C.report("bench_cache_reads", args, start_load, sections, notes(args, best))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
