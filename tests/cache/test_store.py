import dask.array as da
import numpy as np
import pytest
import zarr

from pipeline.cache.cli import main as cache_cli
from pipeline.cache.store import (
    CODECS,
    CacheError,
    CacheLockedError,
    ChunkChecksumError,
    ChunkFiles,
    FeatureCache,
    cache_path,
    list_caches,
    writer_lock,
)
from pipeline.cache.verify import verify

SIGNATURE = {"backbone": "tiny", "resolution": 252, "levels": ["1x"], "amp": "off",
             "checkpoint_sha256": None, "adapter_sha256": None}
SHAPES = {"1x": (4, 3, 3)}


def _cache(tmp_path, signature=SIGNATURE) -> FeatureCache:
    return FeatureCache.create_or_open(tmp_path, signature, SHAPES)


def _value(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((4, 3, 3)).astype(np.float16)


def test_layout_is_readable_by_plain_zarr_and_dask(tmp_path):
    cache = _cache(tmp_path)
    rows = cache.add_keys(["aa", "bb", "cc"])
    cache.write_sample(int(rows[1]), {"1x": _value(1)})
    group = zarr.open_group(cache.path, mode="r")
    assert list(group["keys"][:]) == ["aa", "bb", "cc"]
    assert group["done"][:].tolist() == [False, True, False]
    assert group["features/1x"].dtype == np.float16
    assert group["features/1x"].chunks == (1, 4, 3, 3)
    assert group.attrs["signature"] == SIGNATURE
    array = da.from_zarr(str(cache.path), component="features/1x")
    np.testing.assert_array_equal(array[1].compute(), _value(1))
    assert cache.path.name == cache_path(tmp_path, SIGNATURE).name


def test_add_keys_extends_only_with_new_keys(tmp_path):
    cache = _cache(tmp_path)
    first = cache.add_keys(["aa", "bb"])
    rows = cache.add_keys(["bb", "cc", "aa", "cc"])
    assert list(first) == [0, 1]
    assert list(rows) == [1, 2, 0, 2]
    assert cache.level("1x").shape[0] == 3 and len(cache.keys()) == 3


def test_interrupted_extension_leaves_reusable_rows(tmp_path):
    cache = _cache(tmp_path)
    cache.add_keys(["aa"])
    for name in ("features/1x", "done", "keys"):  # grown, but the keys were never written
        cache.group[name].resize((3, *cache.group[name].shape[1:]))
    cache = FeatureCache.open(cache.path, mode="r+")  # the next run
    assert cache.done().tolist() == [False, False, False]
    rows = cache.add_keys(["bb"])
    assert rows.tolist() == [1] and list(cache.keys()) == ["aa", "bb", ""]


def test_the_next_writer_removes_partial_chunks_a_killed_writer_left(tmp_path):
    cache = _cache(tmp_path)
    cache.write_sample(int(cache.add_keys(["aa"])[0]), {"1x": _value(1)})
    chunk = next(p for p in (cache.path / "features/1x/c").rglob("*") if p.is_file())
    leftover = chunk.with_name(f"{chunk.name}.0123abcd.partial")  # as zarr names its temp files
    leftover.write_bytes(b"half a chunk")
    assert FeatureCache.open(cache.path).done().tolist() == [True]  # readers ignore it
    lock = cache.path.with_suffix(".lock")
    with writer_lock(cache.path):  # a holder that ends, even by an exception, says so
        pass
    assert lock.read_text().endswith("; released") and leftover.exists()
    lock.write_text("pid 4242 on elsewhere since Thu Nov 26 09:00:00 2026")  # killed holding it
    with writer_lock(cache.path):
        assert not leftover.exists() and chunk.exists()
    np.testing.assert_array_equal(FeatureCache.open(cache.path).read(0)["1x"], _value(1))


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_direct_chunk_files_are_zarrs_own(tmp_path, codec):
    cache = FeatureCache.create_or_open(tmp_path, SIGNATURE, SHAPES, codec=codec)
    cache.add_keys(["aa", "bb", "cc", "dd"])
    cache.write_sample(0, {"1x": _value(1)})  # straight to the chunk file
    cache.level("1x")[3] = _value(1)  # through zarr
    chunks = cache.path / "features/1x/c"
    assert (chunks / "0/0/0/0").read_bytes() == (chunks / "3/0/0/0").read_bytes()
    cache.level("1x")[1] = np.zeros((4, 3, 3), np.float16)  # zarr writes no file for it
    files = ChunkFiles.for_array(cache.level("1x"))
    assert files is not None, "the cache's own layout is read directly"
    direct = files.read(0)
    assert direct.dtype == np.float16 and direct.flags.writeable
    np.testing.assert_array_equal(direct, cache.level("1x")[0])
    assert files.read(1) is None and files.read(2) is None
    assert not list(chunks.rglob("*.partial"))
    reader = FeatureCache.open(cache.path)
    for row in range(4):
        np.testing.assert_array_equal(reader.read(row)["1x"], cache.level("1x")[row])


def test_direct_chunk_reads_refuse_other_layouts(tmp_path):
    group = zarr.open_group(tmp_path / "other.zarr", mode="w")
    shards = group.create_array("a", shape=(2, 4, 3, 3), chunks=(1, 4, 3, 3), shards=(2, 4, 3, 3),
                                dtype="float16")
    assert ChunkFiles.for_array(shards) is None
    many = group.create_array("b", shape=(2, 4, 3, 3), chunks=(2, 4, 3, 3), dtype="float16")
    assert ChunkFiles.for_array(many) is None
    plain = group.create_array("c", shape=(2, 4, 3, 3), chunks=(1, 4, 3, 3), dtype="float16",
                               compressors=None)  # no checksum: sizes are still checked
    plain[0] = _value(1)
    np.testing.assert_array_equal(ChunkFiles.for_array(plain).read(0), _value(1))
    chunk = tmp_path / "other.zarr/c/c/0/0/0/0"
    chunk.write_bytes(chunk.read_bytes()[:-2])
    with pytest.raises(ValueError, match="chunk of row 0 holds 70 bytes, not 72"):
        ChunkFiles.for_array(plain).read(0)


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_a_flipped_byte_fails_the_checksum_and_verify_names_the_sample(tmp_path, codec):
    cache = FeatureCache.create_or_open(tmp_path, SIGNATURE, SHAPES, codec=codec)
    cache.add_keys(["aa", "bb"])
    for row in range(2):
        cache.write_sample(row, {"1x": _value(row)})
    chunk = cache.path / "features/1x/c/1/0/0/0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10  # same size, one bit: only a checksum can tell
    chunk.write_bytes(bytes(data))
    reader = FeatureCache.open(cache.path)
    with pytest.raises(ChunkChecksumError, match="row 1 fails its crc32c"):
        reader.read(1)
    with pytest.raises(ValueError, match="checksum"):  # zarr checks the same crc32c
        reader.level("1x")[1]
    problems = verify(reader)
    assert [(p.row, p.key) for p in problems] == [(1, "bb")]
    assert "ChunkChecksumError" in problems[0].problem


def test_a_chunk_shorter_than_its_array_inside_a_valid_checksum_is_refused(tmp_path):
    import google_crc32c
    from numcodecs import Zstd

    cache = FeatureCache.create_or_open(tmp_path, SIGNATURE, SHAPES, codec="zstd")
    cache.write_sample(int(cache.add_keys(["aa"])[0]), {"1x": _value(1)})
    short = Zstd(level=1).encode(_value(1)[:2].tobytes())  # a whole frame, of 2 of 4 channels
    crc = np.uint32(google_crc32c.value(short)).tobytes()
    (cache.path / "features/1x/c/0/0/0/0").write_bytes(short + crc)
    with pytest.raises(ValueError, match="chunk of row 0 decodes to 36 bytes, not 72"):
        FeatureCache.open(cache.path).read(0)


def test_verify_names_a_done_sample_whose_chunk_file_is_gone(tmp_path):
    cache = _cache(tmp_path)
    cache.add_keys(["aa", "bb"])
    for row in range(2):
        cache.write_sample(row, {"1x": _value(row)})
    (cache.path / "features/1x/c/1/0/0/0").unlink()
    problems = verify(FeatureCache.open(cache.path))
    assert [(p.row, p.key, p.problem) for p in problems] == [(1, "bb", "1x chunk file missing")]


def test_done_for_answers_per_key_unknown_unwritten_and_lost_chunks_are_not_done(tmp_path):
    cache = _cache(tmp_path)
    cache.add_keys(["aa", "bb", "cc"])
    for row in (0, 2):
        cache.write_sample(row, {"1x": _value(row)})
    (cache.path / "features/1x/c/2/0/0/0").unlink()  # flagged done, chunk gone
    rows, done = FeatureCache.open(cache.path).done_for(["cc", "zz", "bb", "aa"])
    assert rows.tolist() == [2, -1, 1, 0]
    assert done.tolist() == [False, False, False, True]
    assert FeatureCache.open(cache.path).done_for([])[1].tolist() == []


def test_other_signature_is_refused(tmp_path):
    cache = _cache(tmp_path)
    cache.group.attrs["signature"] = {**SIGNATURE, "amp": "bf16"}  # tampered on disk
    with pytest.raises(CacheError, match="will not be used"):
        FeatureCache.find(tmp_path, SIGNATURE)


def test_one_writer_at_a_time(tmp_path):
    path = cache_path(tmp_path, SIGNATURE)
    with writer_lock(path):
        with pytest.raises(CacheLockedError, match=r"being written by pid \d+"):
            with writer_lock(path):
                pass
    with writer_lock(path):  # released
        pass


def test_verify_names_corrupt_and_non_finite_samples_and_repair_undoes_them(tmp_path, capsys):
    cache = _cache(tmp_path)
    cache.add_keys(["aa", "bb", "cc"])
    for row in range(3):
        cache.write_sample(row, {"1x": _value(row)})
    (cache.path / "features/1x/c/1/0/0/0").write_bytes(b"not zstd at all")
    cache.level("1x")[2] = np.full((4, 3, 3), np.nan, np.float16)
    problems = verify(cache)
    assert [(p.row, p.key) for p in problems] == [(1, "bb"), (2, "cc")]
    assert "unreadable" in problems[0].problem and "not finite" in problems[1].problem
    assert cache_cli(["--cache-dir", str(tmp_path), "verify", cache.cache_id]) == 1
    assert "key bb" in capsys.readouterr().out
    assert cache_cli(["--cache-dir", str(tmp_path), "verify", cache.cache_id, "--repair"]) == 0
    assert FeatureCache.open(cache.path).done().tolist() == [True, False, False]


def test_cli_list_info_rm(tmp_path, capsys):
    cache = _cache(tmp_path)
    cache.add_keys(["aa"])
    cache.write_sample(0, {"1x": _value(0)})
    assert cache_cli(["--cache-dir", str(tmp_path), "list"]) == 0
    out = capsys.readouterr().out
    assert cache.cache_id in out and "1/1 done" in out and "tiny @252px" in out
    assert cache_cli(["list", "--cache-dir", str(tmp_path)]) == 0  # after it, as info takes it
    assert capsys.readouterr().out == out
    assert cache_cli(["list", "--cache-dir", str(tmp_path / "none")]) == 0
    assert capsys.readouterr().out == f"no caches under {(tmp_path / 'none').resolve()}\n"
    assert cache_cli(["--cache-dir", str(tmp_path), "info", cache.cache_id]) == 0
    assert '"samples": 1' in capsys.readouterr().out
    assert cache_cli(["--cache-dir", str(tmp_path), "rm", cache.cache_id]) == 0
    assert not cache.path.exists() and list_caches(tmp_path) == []
    assert cache_cli(["--cache-dir", str(tmp_path), "info", "nope"]) == 2


def test_a_damaged_or_missing_zarr_json_is_named_and_rm_still_removes_it(tmp_path, capsys):
    import subprocess
    import sys

    from conftest import REPO, subprocess_env

    from pipeline.cache.store import DamagedCacheError, find_cache

    cache = _cache(tmp_path)
    (cache.path / "zarr.json").write_text("{ not json")
    (tmp_path / "x.csv").write_text("image,mask,view,split\n")  # paths are checked first
    out = subprocess.run([sys.executable, str(REPO / "train_head.py"), "--data", "x.csv",
                          "--cache", str(cache.path), "--device", "cpu"], cwd=tmp_path,
                         env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.splitlines() == [
        f"error: {cache.path / 'zarr.json'} cannot be read (JSONDecodeError: Expecting property "
        "name enclosed in double quotes: line 1 column 3 (char 2)): the cache is damaged; delete "
        f"it (`sam3-vessel cache rm {cache.path}`) and extract again"]
    (cache.path / "zarr.json").unlink()
    with pytest.raises(DamagedCacheError) as raised:
        find_cache(str(cache.path), "cache")
    assert str(raised.value) == (
        f"{cache.path} is a damaged feature cache: its zarr.json is missing; delete it "
        f"(`sam3-vessel cache rm {cache.path}`) and extract again")
    with pytest.raises(DamagedCacheError, match="its zarr.json is missing"):
        FeatureCache.find(tmp_path, SIGNATURE)  # not "absent": extraction could not create it
    assert cache_cli(["--cache-dir", str(tmp_path), "list"]) == 1
    assert f"{cache.cache_id}  DAMAGED: {cache.path} is a damaged" in capsys.readouterr().out
    assert cache_cli(["--cache-dir", str(tmp_path), "rm", str(cache.path)]) == 0
    assert not cache.path.exists()
    with pytest.raises(CacheError, match=f"no cache '{tmp_path / 'gone.zarr'}' \\(see"):
        find_cache(tmp_path / "gone.zarr", "cache")
