"""One sample's chunk of a feature level, read and written straight in its file (see
`ChunkFiles`): the bytes zarr itself writes for the cache's layout, without zarr's per-call cost.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import google_crc32c
import numpy as np
import zarr
from numcodecs import Blosc, Zstd
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ZstdCodec
from zarr.storage import LocalStore

from pipeline.durable import fsync_folder


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


class ChunkChecksumError(ValueError):
    """A chunk whose bytes no longer match the crc32c stored with them."""


class ChunkFiles:
    """Reads and writes one sample's chunk of a level straight in its file, without zarr's
    machinery.

    Through zarr, `Array[row]` pays a fixed overhead per call (its async codec pipeline) larger
    than reading and decoding a 166 KB chunk (BENCHMARKS.md, "Timings behind the code"). The
    layout here is simple enough to handle directly: one chunk per sample at
    `<array>/c/<row>/0/0/0`, holding little-endian bytes, then at most one compressor of
    `CODECS` (each decodes its own frame), then optionally a crc32c of what came before (zarr's
    `Crc32cCodec`: 4 bytes, little-endian), checked here as zarr checks it. `for_array` returns
    None for an array whose metadata differs from that, and `read` returns None for a chunk
    without a file (zarr writes none for a chunk that holds only the fill value); callers then
    read through zarr.
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
        the same). The data is fsynced before the rename and the folder after it, so a `done`
        flag written next never outlives its chunk in a power cut."""
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
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, path)
            fsync_folder(path.parent)
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
