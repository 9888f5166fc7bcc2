"""The feature cache: the zarr layout (checked and its index rebuilt in `verify`).

``<cache-dir>/<cache-id>.zarr`` is a zarr v3 group that plain zarr and dask read without this
project::

    keys          (N,)            str      hex sha256 of each sample's image file
    done          (N,)            bool     set only after that sample's features are on disk
                                           (fsynced: data before the flag)
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

Every chunk, `keys` and `done` included, ends with a crc32c. A done sample whose feature chunk
file is gone counts as not done (extraction redoes it; a reader raises); a lost or damaged `keys`
or `done` chunk is a `DamagedCacheError` naming the file and `verify --repair`, which rebuilds
what can be derived and says what cannot (`pipeline.cache.verify`).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec, ZstdCodec

from pipeline.cache.chunk_files import (  # noqa: F401
    ChunkChecksumError,
    ChunkFiles,
    numcodecs_compressor,
)
from pipeline.cache.lock import (  # noqa: F401 - the cache's public names live here too
    RELEASED,
    CacheError,
    CacheLockedError,
    remove_partial_writes,
    writer_lock,
)
from pipeline.cache.signature import cache_id as derive_cache_id
from pipeline.cache.signature import signature_digest
from pipeline.errors import UsageError

LAYOUT_VERSION = 1
FEATURE_DTYPE = "float16"
KEY_CHUNK = 65536
# Every chunk ends with a crc32c of its bytes (zarr's Crc32cCodec, cheap beside the read:
# BENCHMARKS.md), so a damaged chunk fails its read and `verify` names it, whatever the codec.
CODECS = {
    "none": lambda: [Crc32cCodec()],
    "zstd": lambda: [ZstdCodec(level=1), Crc32cCodec()],
    "blosc-zstd": lambda: [BloscCodec(cname="zstd", clevel=1, shuffle=BloscShuffle.shuffle),
                           Crc32cCodec()],
    "lz4": lambda: [BloscCodec(cname="lz4", clevel=1, shuffle=BloscShuffle.shuffle),
                    Crc32cCodec()],
}
DEFAULT_CODEC = "none"


class DamagedCacheError(CacheError):
    """A `keys` or `done` chunk, or a done sample's feature chunk, that is lost or damaged."""


def repair_command(path: Path) -> str:
    """The command that finds and repairs the damage of the cache at `path`."""
    path = Path(path)
    return f"sam3-vessel cache verify {path.stem} --repair --cache-dir {path.parent}"


def remove_command(path: Path) -> str:
    """The command that deletes the cache at `path`."""
    path = Path(path)
    return f"sam3-vessel cache rm {path}"


def _missing_metadata(path: Path) -> CacheError:
    """The error for a cache folder without zarr.json: gone, damaged, or not a cache."""
    if not path.exists():
        return CacheError(f"the feature cache {path} no longer exists (removed while in use?); "
                          "extract it again (--extract-missing), then run the command again (a "
                          "training: `sam3-vessel train --resume RUN`)")
    if path.suffix == ".zarr" and path.is_dir():
        return DamagedCacheError(f"{path} is a damaged feature cache: its zarr.json is missing; "
                                 f"delete it (`{remove_command(path)}`) and extract again")
    return CacheError(f"{path} is not a feature cache (no zarr.json)")


def cache_path(cache_dir: str | Path, signature: dict) -> Path:
    return Path(cache_dir) / f"{derive_cache_id(signature)}.zarr"

class FeatureCache:
    """A feature cache on disk. Open with `create_or_open` (writer) or `open` (reader)."""

    def __init__(self, group: zarr.Group, path: Path):
        self.group = group
        self.path = path
        self._arrays: dict[str, zarr.Array] = {}
        self._chunk_files: dict[str, ChunkFiles | None] = {}

    def array(self, name: str) -> zarr.Array:
        """One handle per array: opening one re-reads its metadata (a cost per open), and a
        resize through the handle updates it in place."""
        if name not in self._arrays:
            array = self.group[name]
            if name == "keys":  # a runtime setting, not stored: see `keys`
                array = array.with_config({"write_empty_chunks": True})
            self._arrays[name] = array
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
        for leftover in path.parent.glob(f".{path.name}.creating-*"):  # a killed creation's
            shutil.rmtree(leftover, ignore_errors=True)  # (safe: we hold this cache's lock)
        tmp = path.with_name(f".{path.name}.creating-{os.getpid()}")
        group = zarr.open_group(tmp, mode="w")
        # keys: every chunk written, even an all-empty one, so a missing file means lost keys.
        group.create_array("keys", shape=(0,), chunks=(KEY_CHUNK,), dtype=str,
                           compressors=[Crc32cCodec()], config={"write_empty_chunks": True})
        group.create_array("done", shape=(0,), chunks=(1,), dtype=bool, fill_value=False,
                           compressors=[Crc32cCodec()])
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
            raise _missing_metadata(path)
        try:
            group = zarr.open_group(path, mode=mode)
            group.attrs.get("layout_version")
        except (ValueError, KeyError, TypeError, OSError) as err:  # JSONDecodeError included
            raise DamagedCacheError(
                f"{path / 'zarr.json'} cannot be read ({type(err).__name__}: {err}): the cache "
                f"is damaged; delete it (`{remove_command(path)}`) and extract again") from err
        if group.attrs.get("layout_version") != LAYOUT_VERSION:
            raise CacheError(f"{path} has layout {group.attrs.get('layout_version')}, "
                             f"this version reads {LAYOUT_VERSION}")
        return cls(group, path)

    @classmethod
    def find(cls, cache_dir: str | Path, signature: dict) -> FeatureCache | None:
        """The cache of `signature` under `cache_dir`, read-only, or None."""
        path = cache_path(cache_dir, signature)
        if not path.exists():
            return None
        cache = cls.open(path)  # a folder without zarr.json is damaged, not absent
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
        return self.array(f"features/{name}")

    def level_shape(self, name: str) -> tuple[int, int, int]:
        return tuple(self.level(name).shape[1:])

    def keys(self) -> np.ndarray:
        """(N,) str; empty strings mark rows reserved by an interrupted extension.

        Raises `DamagedCacheError` for a lost or damaged keys chunk (zarr would read a lost one
        as empty keys, and every row would look free) or a key on two rows."""
        array = self.array("keys")
        folder = self.path / "keys" / "c"
        lost = [str(folder / str(c)) for c in range(-(-array.shape[0] // KEY_CHUNK))
                if not (folder / str(c)).is_file()]
        if lost:
            raise DamagedCacheError(f"{lost[0]}: keys chunk lost (which image each row holds is "
                                    f"unknown); run `{repair_command(self.path)}`")
        try:
            keys = np.asarray(array[:], dtype=object)
        except Exception as err:
            raise DamagedCacheError(f"{folder}: keys unreadable ({type(err).__name__}: "
                                    f"{str(err)[:100]}); run `{repair_command(self.path)}`"
                                    ) from None
        named = keys[keys != ""]
        if len(set(named)) != len(named):
            raise DamagedCacheError(f"{folder}: a key is on two rows; run "
                                    f"`{repair_command(self.path)}`")
        return keys

    def flagged(self) -> np.ndarray:
        """(N,) bool: the `done` flags as stored (clipped to the rows that have a key); see
        `done`. Raises `DamagedCacheError` naming the damaged flag chunks."""
        n, array = len(self.keys()), self.array("done")
        try:
            return np.asarray(array[:n], dtype=bool)
        except Exception:
            bad = self.damaged_flags()
            raise DamagedCacheError(
                f"{self.path / 'done' / 'c'}: done flags of {len(bad)} row(s) unreadable (rows "
                f"{bad[:10]}); run `{repair_command(self.path)}`") from None

    def damaged_flags(self) -> list[int]:
        """Rows whose `done` chunk fails its checksum (read one by one: slow, for repairs)."""
        array = self.array("done")
        return [row for row in range(len(self.keys())) if unreadable(array, row)]

    def missing_chunks(self, rows) -> dict[int, str]:
        """row -> level, for those of `rows` with a level whose chunk file is gone (every chunk
        this version writes has one; zarr would read a missing one as zeros)."""
        missing = {}
        for level in self.levels:
            files = self._files(level)
            if files is None:
                continue
            for row in rows:
                if int(row) not in missing and not files.path(int(row)).is_file():
                    missing[int(row)] = level
        return missing

    def done(self) -> np.ndarray:
        """(N,) bool: flagged done and every level's chunk file present (one stat per row and
        level), clipped to the rows that have a key."""
        done = self.flagged()
        done[list(self.missing_chunks(np.flatnonzero(done)))] = False
        return done

    def rows_for(self, keys: list[str]) -> np.ndarray:
        """(len(keys),) int64 row of each key, -1 where the cache has none."""
        index = {k: i for i, k in enumerate(self.keys()) if k}
        return np.array([index.get(k, -1) for k in keys], dtype=np.int64)

    def done_for(self, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The one answer to "which of these keys are done here": (rows, done), rows
        (len(keys),) int64 as `rows_for` (-1: no row), done (len(keys),) bool, True where the
        key has a row and that row is `done()`."""
        rows, done = self.rows_for(keys), self.done()
        has = rows >= 0
        out = np.zeros(len(rows), dtype=bool)
        out[has] = done[rows[has]]
        return rows, out

    def read(self, row: int, levels: list[str] | None = None, *,
             strict: bool = False) -> dict[str, np.ndarray]:
        """One sample's features: level -> (C, h, w) float16 (see `read_into`)."""
        out = {}
        for lvl in levels or self.levels:
            out[lvl] = np.empty(self.level_shape(lvl), FEATURE_DTYPE)
            self.read_into(row, lvl, out[lvl], strict=strict)
        return out

    def read_into(self, row: int, level: str, out: np.ndarray, *, strict: bool = False) -> None:
        """Fill `out` ((C, h, w) float16, C-contiguous: a new array, or a slice of a batch
        tensor) with one level of one sample: straight from its chunk file where the layout
        allows (see `ChunkFiles`), else through zarr (another layout, or a chunk without a
        file, which zarr reads as zeros). `strict` (the readers of training and predict): a
        chunk without a file of a sample flagged done is lost data and raises
        `DamagedCacheError`. Safe from several threads."""
        files = self._files(level)
        if files is not None and files.read_into(row, out):
            return
        if files is None or not strict or not self.array("done")[row]:
            out[...] = self.level(level)[row]
        else:
            raise DamagedCacheError(f"{files.path(row)}: the {level} chunk of row {row} is "
                                    "missing (zarr would read zeros)")

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
            array = self.array(name)
            if array.shape[0] < size:
                array.resize((size, *array.shape[1:]))
        current += [""] * (size - len(current))
        done, reused = self.array("done"), set(free)
        for slot, key in zip(slots, new, strict=True):
            current[slot] = key
            if slot in reused and done[slot]:  # a free row flagged done: not this key's data
                done[slot] = False
        self.array("keys")[:] = np.array(current, dtype=object)
        return self.rows_for(keys)

    def write_sample(self, row: int, features: dict[str, np.ndarray]) -> None:
        """Write one sample's features (level -> (C, h, w)), durably, then mark it done.
        Feature chunks go straight to their files where the layout allows (`ChunkFiles.write`:
        zarr's own bytes, without its per-call overhead), else through zarr."""
        for level, value in features.items():
            files = self._files(level)
            if files is not None:
                files.write(row, value)
            else:
                self.level(level)[row] = value
        self.array("done")[row] = True

    def mark_undone(self, rows: list[int]) -> None:
        for row in rows:
            self.array("done")[row] = False

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


def unreadable(array: zarr.Array, row: int | slice) -> bool:
    try:
        array[row]
    except Exception:  # noqa: BLE001 - any decode failure is damage
        return True
    return False


def list_caches(cache_dir: str | Path) -> list[FeatureCache]:
    return [FeatureCache.open(p) for p in sorted(Path(cache_dir).glob("*.zarr"))
            if (p / "zarr.json").is_file()]


class UnknownCacheError(CacheError, UsageError):
    """A cache id or path given on the command line names no cache (exit status 2)."""


def find_cache(id_or_path: str | Path, cache_dir: str | Path, *, damaged: bool = False
               ) -> Path:
    """The folder of the cache `id_or_path` names: a path to a `.zarr` folder, or an id (as
    `sam3-vessel cache list` prints it) under `cache_dir`. A `.zarr` folder without its
    zarr.json is a `DamagedCacheError` (returned as found with `damaged`, for `rm`)."""
    name = str(id_or_path)
    path = Path(name)
    if not path.exists():
        path = Path(cache_dir) / (name if name.endswith(".zarr") else f"{name}.zarr")
    if (path / "zarr.json").is_file() or (damaged and path.suffix == ".zarr" and path.is_dir()):
        return path
    if path.is_dir():
        raise _missing_metadata(path)
    where = "" if "/" in name else f" under {cache_dir}"  # a path names its own folder
    raise UnknownCacheError(f"no cache {name!r}{where} (see `sam3-vessel cache list`)")
