"""Durable writes on a real full disk (a 1 MB tmpfs, mounted when the tests run as root)."""

import errno
import os
import subprocess
import time

import pytest
from conftest import make_dataset

from pipeline.cache.signature import checkpoint_digest
from pipeline.config import TrainConfig
from pipeline.durable import write_atomically
from pipeline.train.launch import train


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB filesystem of its own."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs",
                                            str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_disk_keeps_the_old_file_and_leaves_no_temporary(small_disk):
    target = small_disk / "last.pt"
    write_atomically(target, b"old" * 1000)
    with pytest.raises(OSError) as info:
        write_atomically(target, b"x" * (2 << 20), hint="then resume")
    assert info.value.errno == errno.ENOSPC
    assert f"while writing {target}" in str(info.value) and "then resume" in str(info.value)
    assert target.read_bytes() == b"old" * 1000
    assert [p.name for p in small_disk.iterdir()] == ["last.pt"]


def test_training_into_a_full_run_directory_names_the_file(tmp_path, small_disk):
    manifest = make_dataset(tmp_path / "d", 6, size=32)
    config = TrainConfig(data=str(manifest), backbone="tiny", cache_dir=str(tmp_path / "cache"),
                         run_dir=str(small_disk / "run"), epochs=1, batch_size=4, e2e_every=0,
                         loader_workers=0, overlays=0, device="cpu", extract_missing=True)
    with pytest.raises(OSError) as info:  # today: RuntimeError: basic_ios::clear
        train(config)
    assert info.value.errno == errno.ENOSPC, info.value
    assert f"{small_disk / 'run'}" in str(info.value) and "free space" in str(info.value)
    assert not [p for p in (small_disk / "run").iterdir() if p.name.endswith(".tmp")]


def test_a_copy_with_preserved_timestamps_is_hashed_again(tmp_path):
    old, new = tmp_path / "sam3.pt", tmp_path / "other.pt"
    old.write_bytes(b"a" * 4096)
    new.write_bytes(b"b" * 4096)
    first = checkpoint_digest(old)
    stamp = old.stat()
    os.utime(new, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    time.sleep(0.05)  # the copy's ctime differs from the original's
    subprocess.run(["cp", "-p", str(new), str(old)], check=True)
    assert (old.stat().st_size, old.stat().st_mtime_ns) == (stamp.st_size, stamp.st_mtime_ns)
    assert checkpoint_digest(old) != first  # today: the memo returns the old digest
    assert checkpoint_digest(old) == checkpoint_digest(new)
