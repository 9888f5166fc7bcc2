"""The feature cache: the one module that knows the zarr layout.

``<cache-dir>/<cache-id>.zarr`` is a zarr v3 group that plain zarr and dask read without this
project::

    keys          (N,)            str      hex sha256 of each sample's image file
    done          (N,)            bool     set only after that sample's features are on disk
    features/1x   (N, 256, h, w)  float16  `vision_features`
    features/2x   (N, 256, 2h, 2w)         optional `backbone_fpn` levels
    features/4x   (N, 256, 4h, 4w)
    features/block<K>  (N, h, w, C)  float16  instead, with --cache-block K: the trunk's
                                           tokens after block K (each level's shape is the
                                           array's; readers never re-declare it)

Group attributes: `signature` (what the features depend on), `signature_sha256`, `cache_id`,
`layout_version`, `created`, `codec`. Every sample is its own chunk, and `done` has one chunk per
sample, so concurrent writers (processes, GPUs, machines) never touch the same storage object,
and zarr's LocalStore writes each object through a rename: a killed writer leaves no half chunk.
One writer run holds ``<cache-id>.lock`` (an flock, released by the kernel if the run dies).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numpy as np
import zarr
from numcodecs import Blosc, Zstd
from zarr.codecs import BloscCodec, BloscShuffle, BytesCodec, Crc32cCodec, ZstdCodec
from zarr.storage import LocalStore

from pipeline.signature import cache_id as derive_cache_id
from pipeline.signature import signature_digest

LAYOUT_VERSION = 1
FEATURE_DTYPE = "float16"
KEY_CHUNK = 65536
# Every chunk ends with a crc32c of its bytes (zarr's Crc32cCodec; about 0.1 ms per 2.65 MB
# here), so a damaged chunk fails its read and `verify` names it, whatever the compressor.
CODECS = {
    "none": lambda: [Crc32cCodec()],
    "zstd": lambda: [ZstdCodec(level=1), Crc32cCodec()],
    "blosc-zstd": lambda: [BloscCodec(cname="zstd", clevel=1, shuffle=BloscShuffle.shuffle),
                           Crc32cCodec()],
    "lz4": lambda: [BloscCodec(cname="lz4", clevel=1, shuffle=BloscShuffle.shuffle),
                    Crc32cCodec()],
}
DEFAULT_CODEC = "none"


class CacheError(RuntimeError):
    """A cache that is missing, locked, stale or damaged; the message says what to do."""


class CacheLockedError(CacheError):
    pass


@dataclass(frozen=True)
class SampleProblem:
    row: int
    key: str
    problem: str


def cache_path(cache_dir: str | Path, signature: dict) -> Path:
    return Path(cache_dir) / f"{derive_cache_id(signature)}.zarr"


RELEASED = "released"


def remove_partial_writes(path: Path) -> None:
    """Delete the `<chunk>.<uuid>.partial` files a killed writer left in the cache at `path`.
    Chunks are written to such a file and renamed into place (by zarr and by `ChunkFiles.write`),
    so they are never read; they only hold disk (up to 42 MB each at sam3's 4x level). Safe under
    `writer_lock` only."""
    for leftover in Path(path).rglob("*.partial"):
        leftover.unlink(missing_ok=True)


def numcodecs_compressor(codec, typesize: int | None = None):
    """The numcodecs codec that compresses as zarr's `codec` (a ZstdCodec or BloscCodec) does,
    configured as zarr configures it; `typesize` overrides a BloscCodec's (zarr sets it from the
    array's dtype when it creates the array)."""
    if isinstance(codec, ZstdCodec):
        return Zstd.from_config({"level": codec.level, "checksum": codec.checksum})
    if isinstance(codec, BloscCodec):
        shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[codec.shuffle.value]
        return Blosc.from_config({"cname": codec.cname.name, "clevel": codec.clevel,
                                  "shuffle": shuffle, "blocksize": codec.blocksize,
                                  "typesize": typesize or codec.typesize})
    raise TypeError(f"no numcodecs equivalent for {codec!r}")


@contextmanager
def writer_lock(path: Path, *, wait: bool = False):
    """Hold the single-writer lock of the cache at `path` (an flock on `<path>.lock` sibling).

    The lock file names its holder; a holder that ends (even by an exception) appends
    "released". A lock taken over from a holder that never did (it was killed) first removes
    the partial chunk files that holder may have left (`remove_partial_writes`): only then,
    because that walk visits every chunk of the cache."""
    lock_path = path.with_suffix(".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    handle, held = open(lock_path, "a+"), False
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise CacheLockedError(
                f"cache {path.name} is being written by {holder}; wait for that run to finish "
                "(or pass --wait to queue behind it)"
            ) from None
        held = True
        handle.seek(0)
        previous = handle.read().strip()
        if previous and not previous.endswith(RELEASED):
            remove_partial_writes(path)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}")
        handle.flush()
        yield
    finally:
        if held:
            handle.write(f"; {RELEASED}")
            handle.flush()
        handle.close()  # closing releases the flock


class ChunkChecksumError(ValueError):
    """A chunk whose bytes no longer match the crc32c stored with them."""


class ChunkFiles:
    """Reads and writes one sample's chunk of a level straight in its file, without zarr's
    machinery.

    Through zarr, `Array[row]` costs about 0.7 ms of fixed overhead per call (its async codec
    pipeline), more than reading and decoding a 166 KB chunk. The layout here is simple enough to
    handle directly: one chunk per sample at `<array>/c/<row>/0/0/0`, holding little-endian bytes,
    then at most one compressor of `CODECS` (each decodes its own frame), then optionally a
    crc32c of what came before (zarr's `Crc32cCodec`: 4 bytes, little-endian), checked here as
    zarr checks it. `for_array` returns None for an array whose metadata differs from that, and
    `read` returns None for a chunk without a file (zarr writes none for a chunk that holds only
    the fill value); callers then read through zarr.
    """

    def __init__(self, folder: Path, shape: tuple[int, ...], dtype: np.dtype, compressor,
                 checksum: bool):
        self.folder, self.shape, self.dtype = folder, shape, dtype
        self._compressor, self._checksum = compressor, checksum
        self.nbytes = int(np.prod(shape)) * dtype.itemsize

    @classmethod
    def for_array(cls, array: zarr.Array) -> ChunkFiles | None:
        meta, store = array.metadata, array.store_path.store
        if (getattr(meta, "zarr_format", None) != 3 or not isinstance(store, LocalStore)
                or len(array.shape) != 4
                or meta.chunk_key_encoding.encode_chunk_key((7, 0, 0, 0)) != "c/7/0/0/0"
                or tuple(meta.chunk_grid.chunk_shape) != (1, *array.shape[1:])):
            return None
        codecs = list(meta.codecs)
        if (sys.byteorder != "little" or not codecs or not isinstance(codecs[0], BytesCodec)
                or codecs[0].endian is None or codecs[0].endian.value != "little"):
            return None
        rest = codecs[1:]
        checksum = bool(rest) and isinstance(rest[-1], Crc32cCodec)
        rest = rest[:-1] if checksum else rest
        if not rest:
            compressor = None
        elif len(rest) == 1 and isinstance(rest[0], ZstdCodec | BloscCodec):
            compressor = numcodecs_compressor(rest[0])
        else:
            return None
        folder = Path(store.root) / array.store_path.path / "c"
        return cls(folder, tuple(array.shape[1:]), np.dtype(array.dtype), compressor, checksum)

    def path(self, row: int) -> Path:
        """The chunk file of row `row` (it may not exist)."""
        return self.folder / str(row) / "0" / "0" / "0"

    def write(self, row: int, value: np.ndarray) -> None:
        """Store `value` ((C, h, w)) as row `row`'s chunk: the bytes zarr would write for it, put
        in place by a rename (a `<chunk>.<uuid>.partial` file first), as zarr's LocalStore does.
        Every chunk gets a file, including an all-zero one (zarr would skip it; both read back
        the same)."""
        value = np.ascontiguousarray(value, dtype=self.dtype)
        if value.shape != self.shape:
            raise ValueError(f"row {row}: expected {self.shape}, got {value.shape}")
        data = value.reshape(-1).view(np.uint8)
        if self._compressor is not None:
            data = np.frombuffer(self._compressor.encode(data), np.uint8)
        parts = [data]
        if self._checksum:
            parts.append(np.uint32(google_crc32c.value(data)).reshape(1).view(np.uint8))
        path = self.path(row)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
        try:
            with open(partial, "wb") as file:
                for part in parts:
                    file.write(part)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)

    def read(self, row: int) -> np.ndarray | None:
        """(C, h, w) in the array's dtype, or None if the chunk has no file."""
        out = np.empty(self.shape, self.dtype)
        return out if self.read_into(row, out) else None

    def read_into(self, row: int, out: np.ndarray) -> bool:
        """Fill `out` ((C, h, w), the array's dtype, C-contiguous: for example a slice of a
        pinned batch tensor) with row `row`; False (and `out` untouched) if the chunk has no
        file. Uncompressed chunks are read straight into `out`."""
        if out.shape != self.shape or out.dtype != self.dtype or not out.flags.c_contiguous:
            raise ValueError(f"read_into needs a C-contiguous {self.shape} {self.dtype} array, "
                             f"got {out.shape} {out.dtype}")
        try:
            file = open(self.path(row), "rb", buffering=0)
        except FileNotFoundError:
            return False
        with file:
            size, crc = os.fstat(file.fileno()).st_size, 4 * self._checksum
            if self._compressor is None:
                if size - crc != self.nbytes:
                    raise ValueError(f"chunk of row {row} holds {size - crc} bytes, "
                                     f"not {self.nbytes}")
                payload = out.reshape(-1).view(np.uint8)  # a view: `out` itself is filled
            else:
                payload = np.empty(size - crc, np.uint8)
            stored = np.empty(crc, np.uint8)
            for part in (payload, stored):
                view, got = memoryview(part), 0
                while got < len(view):  # a read may return less (network filesystems, signals)
                    step = file.readinto(view[got:])
                    if not step:
                        raise ValueError(f"chunk of row {row} changed size while being read")
                    got += step
        if self._checksum and google_crc32c.value(payload).to_bytes(4, "little") != bytes(stored):
            raise ChunkChecksumError(f"chunk of row {row} fails its crc32c checksum")
        if self._compressor is not None:
            decoded = self._compressor.decode(payload)  # decoding into `out` would not see a
            if len(decoded) != self.nbytes:            # frame shorter than the chunk
                raise ValueError(f"chunk of row {row} decodes to {len(decoded)} bytes, "
                                 f"not {self.nbytes}")
            out.reshape(-1).view(np.uint8)[:] = np.frombuffer(decoded, np.uint8)
        return True


class FeatureCache:
    """A feature cache on disk. Open with `create_or_open` (writer) or `open` (reader)."""

    def __init__(self, group: zarr.Group, path: Path):
        self.group = group
        self.path = path
        self._arrays: dict[str, zarr.Array] = {}
        self._chunk_files: dict[str, ChunkFiles | None] = {}

    def _array(self, name: str) -> zarr.Array:
        """One handle per array: opening one re-reads its metadata (about 0.4 ms), and a resize
        through the handle updates it in place."""
        if name not in self._arrays:
            self._arrays[name] = self.group[name]
        return self._arrays[name]

    # ---------------------------------------------------------------- opening
    @classmethod
    def create_or_open(
        cls, cache_dir: str | Path, signature: dict, level_shapes: dict[str, tuple[int, int, int]],
        *, codec: str = DEFAULT_CODEC,
    ) -> FeatureCache:
        """Open the cache of `signature` for writing, creating it (with N = 0) if needed.

        `level_shapes`: per level name, the (C, h, w) of one sample's features.
        Call under `writer_lock`.
        """
        path = cache_path(cache_dir, signature)
        if (path / "zarr.json").is_file():
            cache = cls(zarr.open_group(path, mode="r+"), path)
            cache.check_signature(signature)
            return cache
        tmp = path.with_name(f".{path.name}.creating-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        group = zarr.open_group(tmp, mode="w")
        group.create_array("keys", shape=(0,), chunks=(KEY_CHUNK,), dtype=str)
        group.create_array("done", shape=(0,), chunks=(1,), dtype=bool, fill_value=False)
        for level, shape in sorted(level_shapes.items()):
            group.create_array(
                f"features/{level}", shape=(0, *shape), chunks=(1, *shape),
                dtype=FEATURE_DTYPE, fill_value=0.0, compressors=CODECS[codec](),
            )
        group.attrs.update({
            "signature": signature,
            "signature_sha256": signature_digest(signature),
            "cache_id": path.stem,
            "layout_version": LAYOUT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "codec": codec,
        })
        tmp.rename(path)  # a cache appears whole or not at all
        return cls(zarr.open_group(path, mode="r+"), path)

    @classmethod
    def open(cls, path: str | Path, *, mode: str = "r") -> FeatureCache:
        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise CacheError(f"{path} is not a feature cache (no zarr.json)")
        group = zarr.open_group(path, mode=mode)
        if group.attrs.get("layout_version") != LAYOUT_VERSION:
            raise CacheError(f"{path} has layout {group.attrs.get('layout_version')}, "
                             f"this version reads {LAYOUT_VERSION}")
        return cls(group, path)

    @classmethod
    def find(cls, cache_dir: str | Path, signature: dict) -> FeatureCache | None:
        """The cache of `signature` under `cache_dir`, read-only, or None."""
        path = cache_path(cache_dir, signature)
        if not (path / "zarr.json").is_file():
            return None
        cache = cls.open(path)
        cache.check_signature(signature)
        return cache

    def check_signature(self, signature: dict) -> None:
        if self.signature != signature:
            raise CacheError(
                f"{self.path} holds features with signature {self.signature}, "
                f"not the requested {signature}; it will not be used"
            )

    # ---------------------------------------------------------------- reading
    @property
    def signature(self) -> dict:
        return dict(self.group.attrs["signature"])

    @property
    def cache_id(self) -> str:
        return self.path.stem

    @property
    def levels(self) -> list[str]:
        return sorted(name for name, _ in self.group["features"].arrays())

    def level(self, name: str) -> zarr.Array:
        """The (N, C, h, w) float16 zarr array of one level."""
        return self._array(f"features/{name}")

    def level_shape(self, name: str) -> tuple[int, int, int]:
        return tuple(self.level(name).shape[1:])

    def keys(self) -> np.ndarray:
        """(N,) str; empty strings mark rows reserved by an interrupted extension."""
        return np.asarray(self._array("keys")[:], dtype=object)

    def done(self) -> np.ndarray:
        """(N,) bool, clipped to the rows that have a key."""
        return np.asarray(self._array("done")[: len(self.keys())], dtype=bool)

    def rows_for(self, keys: list[str]) -> np.ndarray:
        """(len(keys),) int64 row of each key, -1 where the cache has none."""
        index = {k: i for i, k in enumerate(self.keys()) if k}
        return np.array([index.get(k, -1) for k in keys], dtype=np.int64)

    def read(self, row: int, levels: list[str] | None = None) -> dict[str, np.ndarray]:
        """One sample's features: level -> (C, h, w) float16 (see `read_into`)."""
        out = {}
        for lvl in levels or self.levels:
            out[lvl] = np.empty(self.level_shape(lvl), FEATURE_DTYPE)
            self.read_into(row, lvl, out[lvl])
        return out

    def read_into(self, row: int, level: str, out: np.ndarray) -> None:
        """Fill `out` ((C, h, w) float16, C-contiguous: a new array, or a slice of a batch
        tensor) with one level of one sample: straight from its chunk file where the layout
        allows (see `ChunkFiles`), else through zarr (another layout, or a chunk of fill values,
        which has no file). Safe from several threads."""
        files = self._files(level)
        if files is None or not files.read_into(row, out):
            out[...] = self.level(level)[row]

    def _files(self, level: str) -> ChunkFiles | None:
        if level not in self._chunk_files:
            self._chunk_files[level] = ChunkFiles.for_array(self.level(level))
        return self._chunk_files[level]

    def as_dask(self, level: str = "1x"):
        """A level as a dask array (N, C, h, w), one sample per block."""
        import dask.array as da

        return da.from_zarr(self.level(level))

    def size_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    # ---------------------------------------------------------------- writing
    def add_keys(self, keys: list[str]) -> np.ndarray:
        """Give every new key a row (growing the arrays); returns the row of each of `keys`."""
        rows = self.rows_for(keys)
        new = list(dict.fromkeys(k for k, r in zip(keys, rows, strict=True) if r < 0))
        if not new:
            return rows
        current = list(self.keys())
        free = [i for i, k in enumerate(current) if not k]  # left by an interrupted extension
        slots = free[: len(new)] + list(range(len(current), len(current) + len(new) - len(free)))
        size = max(len(current), max(slots) + 1)
        # Grow features and done before keys: a row exists once its key is written.
        for name in [f"features/{lvl}" for lvl in self.levels] + ["done", "keys"]:
            array = self._array(name)
            if array.shape[0] < size:
                array.resize((size, *array.shape[1:]))
        current += [""] * (size - len(current))
        for slot, key in zip(slots, new, strict=True):
            current[slot] = key
        self._array("keys")[:] = np.array(current, dtype=object)
        return self.rows_for(keys)

    def write_sample(self, row: int, features: dict[str, np.ndarray]) -> None:
        """Write one sample's features (level -> (C, h, w)), then mark it done. Feature chunks
        go straight to their files where the layout allows (`ChunkFiles.write`: zarr's own
        bytes, without its ~3 ms per-call overhead), else through zarr."""
        for level, value in features.items():
            files = self._files(level)
            if files is not None:
                files.write(row, value)
            else:
                self.level(level)[row] = value
        self._array("done")[row] = True

    def mark_undone(self, rows: list[int]) -> None:
        for row in rows:
            self._array("done")[row] = False

    # ---------------------------------------------------------------- checking
    def verify(self) -> list[SampleProblem]:
        """Re-read every done sample as training reads it; report those unreadable (a damaged
        chunk fails its checksum or its codec), without a chunk file (every chunk this version
        writes has one: a missing file is lost data, which zarr would read as zeros) or not
        finite."""
        keys, done = self.keys(), self.done()
        problems = []
        for row in np.flatnonzero(done):
            for level in self.levels:
                files = self._files(level)
                if files is not None and not files.path(int(row)).is_file():
                    problems.append(SampleProblem(int(row), keys[row],
                                                  f"{level} chunk file missing"))
                    break
                try:
                    value = self.read(int(row), [level])[level]
                except Exception as err:
                    problems.append(SampleProblem(int(row), keys[row], f"{level} unreadable: "
                                                  f"{type(err).__name__}: {str(err)[:120]}"))
                    break
                if not np.isfinite(value).all():
                    problems.append(SampleProblem(int(row), keys[row], f"{level} not finite"))
                    break
        return problems

    def summary(self) -> dict:
        keys = self.keys()
        return {
            "cache_id": self.cache_id,
            "path": str(self.path),
            "samples": int(sum(1 for k in keys if k)),
            "done": int(self.done().sum()),
            "levels": {lvl: list(self.level_shape(lvl)) for lvl in self.levels},
            "bytes_on_disk": self.size_on_disk(),
            "codec": self.group.attrs.get("codec"),
            "created": self.group.attrs.get("created"),
            "signature": self.signature,
        }


def list_caches(cache_dir: str | Path) -> list[FeatureCache]:
    return [FeatureCache.open(p) for p in sorted(Path(cache_dir).glob("*.zarr"))
            if (p / "zarr.json").is_file()]


if __name__ == "__main__":
    from pipeline.cache_cli import main

    raise SystemExit(main())
