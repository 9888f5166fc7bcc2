"""Faults a real cache meets, each with real processes, files and zarr stores: a second writer,
a full disk, a damaged chunk, an image replaced on disk, and a cache made with something else.

(SIGKILL during extraction and during training is covered in test_extraction.py and
train/test_setup.py.)
"""

import errno
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr.storage
from conftest import REPO, finished_done_chunks, make_dataset, subprocess_env
from PIL import Image

from pipeline.cache.cli import main as cache_cli
from pipeline.cache.store import CacheError, ChunkFiles, FeatureCache
from pipeline.cli import extract_main
from pipeline.config import ExtractConfig, TrainConfig
from pipeline.data.checks import check_manifest
from pipeline.data.images import load_preprocessed
from pipeline.data.manifest import read_manifest, sample_keys
from pipeline.extraction import run_extraction
from pipeline.model.backbone import build_backbone
from pipeline.model.lora import attach_lora
from pipeline.train.launch import train
from pipeline.train.setup import MissingFeaturesError, ensure_cache


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """In-process work on one thread, as the subprocesses (OMP_NUM_THREADS=1): on a busy
    two-core machine, spinning worker threads cost more than they give."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _extract(manifest, cache_dir, **kw):
    """In-process Stage A, one image per forward so every run computes identical features."""
    config = ExtractConfig(data=str(manifest), backbone="tiny", cache_dir=str(cache_dir),
                           batch_size=1, loader_workers=0, device="cpu",
                           **{"augment_copies": 0, **kw})  # cache mechanics: no copies
    samples = read_manifest(manifest)
    return run_extraction(config, samples, sample_keys(samples))


def _extract_cmd(manifest, cache_dir, *extra):
    return [sys.executable, str(REPO / "extract_features.py"), "--data", str(manifest),
            "--backbone", "tiny", "--cache-dir", str(cache_dir), "--batch-size", "1",
            "--loader-workers", "0", "--device", "cpu", "--augment-copies", "0", *extra]


def _train_config(manifest, tmp_path, **kw) -> TrainConfig:
    values = dict(data=str(manifest), backbone="tiny", cache_dir=str(tmp_path / "cache"),
                  run_dir=str(tmp_path / "run"), epochs=1, batch_size=4, e2e_every=0,
                  loader_workers=0, overlays=0, device="cpu", augment_copies=0)
    values.update(kw)
    return TrainConfig(**values)


def _features_by_key(cache: FeatureCache) -> dict[str, np.ndarray]:
    keys, done, level = cache.keys(), cache.done(), cache.level("1x")
    return {keys[r]: level[r] for r in np.flatnonzero(done)}


def _files(path):
    return {p: p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file()}


# ------------------------------------------------------------------ two writers on one cache


def _flocks(lock_file) -> dict[int, str]:
    """pid -> "holds" or "waits", for the flocks on `lock_file` (from /proc/locks)."""
    inode, found = str(lock_file.stat().st_ino), {}
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) < 7:
            continue
        waits = fields[1] == "->"
        kind, pid, device_inode = fields[1 + waits], fields[4 + waits], fields[5 + waits]
        if kind == "FLOCK" and device_inode.rsplit(":", 1)[-1] == inode:
            found[int(pid)] = "waits" if waits else "holds"
    return found


def _stopped(pid) -> bool:
    """Whether every thread of `pid` is stopped (state T), so it writes nothing more."""
    states = [(task / "stat").read_text().rsplit(")", 1)[1].split()[0]
              for task in Path(f"/proc/{pid}/task").iterdir()]
    return all(state == "T" for state in states)


def _until(condition, what, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


def test_a_second_extraction_is_refused_and_wait_queues_behind_the_first(tmp_path):
    n = 32
    manifest = make_dataset(tmp_path / "d", n, size=32)
    cache_dir, logs = tmp_path / "cache", tmp_path / "logs"
    logs.mkdir()
    processes, handles = {}, []

    def start(name, *extra):
        handles.extend([(logs / f"{name}.out").open("w"), (logs / f"{name}.err").open("w")])
        processes[name] = subprocess.Popen(_extract_cmd(manifest, cache_dir, *extra),
                                           env=subprocess_env(), stdout=handles[-2],
                                           stderr=handles[-1])
        return processes[name]

    try:
        first = start("first")
        _until(lambda: first.poll() is not None or finished_done_chunks(cache_dir) > 0,
               "the first run has written samples")
        # Hold the first run mid-extraction, lock taken, for as long as the others need to
        # start: a bigger dataset would do the same, at the cost of seconds and flakiness.
        os.kill(first.pid, signal.SIGSTOP)
        assert first.poll() is None, "the first run ended before it could be held"
        _until(lambda: _stopped(first.pid), "the first run is stopped")
        path = next(cache_dir.glob("*.zarr"))
        lock, held = path.with_suffix(".lock"), _files(path)
        assert _flocks(lock) == {first.pid: "holds"}, "the first run was held after its end"
        assert 0 < FeatureCache.open(path).done().sum() < n
        second, queued = start("second"), start("queued", "--wait")
        assert second.wait(timeout=120) != 0
        _until(lambda: queued.poll() is not None or _flocks(lock).get(queued.pid) == "waits",
               "--wait waits on the lock")
        assert queued.poll() is None, (logs / "queued.err").read_text()[-2000:]
        _until(lambda: "waiting for cache" in (logs / "queued.err").read_text(),
               "--wait says whom it waits for")
        assert _flocks(lock) == {first.pid: "holds", queued.pid: "waits"}
        assert _files(path) == held  # neither of them wrote into the cache
        os.kill(first.pid, signal.SIGCONT)
        assert first.wait(timeout=180) == 0, (logs / "first.err").read_text()[-2000:]
        assert queued.wait(timeout=120) == 0, (logs / "queued.err").read_text()[-2000:]
    finally:
        for process in processes.values():
            process.kill()  # SIGKILL ends a stopped process too
            process.wait()
        for handle in handles:
            handle.close()
    refusal = (logs / "second.err").read_text()
    assert re.search(rf"cache {re.escape(path.name)} is being written by pid {first.pid} on "
                     r".*--wait", refusal), refusal[-2000:]
    assert "extracted" not in (logs / "second.out").read_text()
    assert f"extracted {n} rows in " in (logs / "first.out").read_text()
    assert f"nothing to extract: the cache already holds all {n} rows" in (
        logs / "queued.out").read_text()
    assert f"pid {queued.pid} " in lock.read_text()  # it held the lock after the first
    assert cache_cli(["--cache-dir", str(cache_dir), "verify", path.stem]) == 0
    cache = FeatureCache.open(path)
    assert len(cache.keys()) == n and cache.done().all()


# ------------------------------------------------------------------ disk full


def test_disk_full_keeps_finished_samples_and_the_rerun_completes(tmp_path, monkeypatch):
    n = 8
    manifest = make_dataset(tmp_path / "d", n, size=32)
    clean = _features_by_key(FeatureCache.open(_extract(manifest, tmp_path / "clean").path))
    real_set, real_write, written, refused = zarr.storage.LocalStore.set, ChunkFiles.write, [], []

    def room_for(key: str, path: str) -> None:
        """Every chunk, feature (written directly) or done flag (through zarr), takes room:
        the first 7 fit, then the disk is full."""
        if len(written) >= 7:
            refused.append(key)
            raise OSError(errno.ENOSPC, "No space left on device", path)
        written.append(key)

    async def set_until_full(store, key, value):
        if "/c/" in key:
            room_for(key, str(store.root / key))
        return await real_set(store, key, value)

    def write_until_full(files, row, value):
        room_for(f"features/c/{row}", str(files.folder / str(row)))
        return real_write(files, row, value)

    with monkeypatch.context() as patch:
        patch.setattr(zarr.storage.LocalStore, "set", set_until_full)
        patch.setattr(ChunkFiles, "write", write_until_full)
        with pytest.raises(OSError) as info:
            _extract(manifest, tmp_path / "cache")
    message = str(info.value)
    assert info.value.errno == errno.ENOSPC and "No space left on device" in message
    named = re.search(r"the features of (\S+) into", message)
    assert named, message
    image = named.group(1)
    samples = read_manifest(manifest)
    key_of = dict(zip((str(s.image) for s in samples), sample_keys(samples), strict=True))
    cache = FeatureCache.open(next((tmp_path / "cache").glob("*.zarr")))
    failed_rows = {int(re.search(r"/c/(\d+)", k).group(1)) for k in refused}
    assert int(cache.rows_for([key_of[image]])[0]) in failed_rows  # the image it names failed
    partial = _features_by_key(cache)
    assert 0 < len(partial) < n
    for key, value in partial.items():  # what was marked done is whole and right
        np.testing.assert_array_equal(value, clean[key])

    summary = _extract(manifest, tmp_path / "cache")
    assert (summary.extracted, summary.reused) == (n - len(partial), len(partial))
    resumed = _features_by_key(FeatureCache.open(summary.path))
    assert resumed.keys() == clean.keys()
    for key, value in resumed.items():
        np.testing.assert_array_equal(value, clean[key])


# ------------------------------------------------------------------ a damaged chunk


def test_a_corrupted_chunk_is_found_repaired_and_redone(tmp_path, capsys):
    manifest = make_dataset(tmp_path / "d", 6, size=32)
    summary = _extract(manifest, tmp_path / "cache")
    cache = FeatureCache.open(summary.path)
    before = _features_by_key(cache)
    victim = read_manifest(manifest)[1]  # a training row, read in the first epoch
    key = sample_keys([victim])[0]
    row = int(cache.rows_for([key])[0])
    chunk = summary.path / f"features/1x/c/{row}/0/0/0"  # zarr v3: one chunk per sample
    assert chunk.is_file()
    chunk.write_bytes(b"\x00garbage\xff" * 50)

    with pytest.raises(CacheError) as info:  # training meets the damaged sample
        train(_train_config(manifest, tmp_path))
    assert str(victim.image) in str(info.value) and f"(row {row})" in str(info.value)
    assert (f"sam3-vessel cache verify {summary.cache_id} --repair --cache-dir "
            f"{summary.path.parent}") in str(info.value)  # the folder too: run as printed
    printed = re.search(r"`sam3-vessel cache (.*?)`", str(info.value)).group(1)
    capsys.readouterr()
    assert cache_cli(shlex.split(printed.replace(" --repair", ""))) == 1  # today: "0 bad"
    assert "1 bad" in capsys.readouterr().out
    assert cache_cli(["--cache-dir", str(tmp_path / "cache"), "verify", summary.cache_id]) == 1
    out = capsys.readouterr().out
    assert f"row {row} key {key}: 1x unreadable" in out and "1 bad" in out

    assert cache_cli(["--cache-dir", str(tmp_path / "cache"), "verify", summary.cache_id,
                      "--repair"]) == 0
    assert np.flatnonzero(~FeatureCache.open(summary.path).done()).tolist() == [row]
    redo = _extract(manifest, tmp_path / "cache")
    assert (redo.extracted, redo.reused) == (1, 5)
    after = _features_by_key(FeatureCache.open(summary.path))
    assert after.keys() == before.keys()
    for k, value in after.items():
        np.testing.assert_array_equal(value, before[k])
    assert cache_cli(["--cache-dir", str(tmp_path / "cache"), "verify", summary.cache_id]) == 0


# ------------------------------------------------------------------ an image replaced on disk


def test_an_image_replaced_on_disk_is_extracted_again_under_its_new_key(tmp_path):
    manifest = make_dataset(tmp_path / "d", 6, size=32)
    first = _extract(manifest, tmp_path / "cache")
    samples = read_manifest(manifest)
    replaced = samples[3]
    old_key = sample_keys([replaced])[0]
    cache = FeatureCache.open(first.path)
    old_row = int(cache.rows_for([old_key])[0])
    old_features = cache.read(old_row)["1x"]
    rng = np.random.default_rng(99)
    Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(replaced.image)

    second = _extract(manifest, tmp_path / "cache")
    assert (second.extracted, second.reused, second.total) == (1, 5, 6)
    cache = FeatureCache.open(first.path)
    new_key = sample_keys([replaced])[0]
    new_row = int(cache.rows_for([new_key])[0])
    assert new_key != old_key and len(cache.keys()) == 7 and new_row == 6
    assert int(cache.rows_for([old_key])[0]) == old_row
    np.testing.assert_array_equal(cache.read(old_row)["1x"], old_features)  # left alone
    with torch.inference_mode():
        live = build_backbone("tiny").forward_image(
            load_preprocessed(replaced.image, 252)[None])["vision_features"][0].numpy()
    new_features = cache.read(new_row)["1x"]
    np.testing.assert_allclose(new_features, live, rtol=1e-3, atol=2e-3)
    assert not np.allclose(new_features, old_features, atol=1e-2)
    # Training finds rows by the keys the manifest check computes: the new row, not the old.
    report = check_manifest(samples, require_masks=True)
    assert int(cache.rows_for([report.keys[3]])[0]) == new_row


# ------------------------------------------------------------------ a cache made differently


def _saved_adapter(folder):
    model = attach_lora(build_backbone("tiny"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    model.save_pretrained(folder)
    return folder


def test_training_with_an_adapter_refuses_the_frozen_cache(tmp_path):
    manifest = make_dataset(tmp_path / "d", 6, size=32)
    cache_dir, run = tmp_path / "cache", tmp_path / "run"
    frozen = _extract(manifest, cache_dir)
    adapter = _saved_adapter(tmp_path / "adapter")
    result = subprocess.run(
        [sys.executable, str(REPO / "train_head.py"), "--data", str(manifest), "--backbone",
         "tiny", "--cache-dir", str(cache_dir), "--run-dir", str(run), "--adapter",
         str(adapter), "--epochs", "1", "--loader-workers", "0", "--device", "cpu",
         "--augment-copies", "0"],
        env=subprocess_env(), capture_output=True, text=True, timeout=300)
    err = result.stderr
    assert result.returncode == 1, err[-2000:]
    command = (f"sam3-vessel extract --data {manifest} --backbone tiny --adapter "
               f"{adapter} --levels 1x --amp off --cache-dir {cache_dir} --device cpu")
    assert "does not exist" in err and f"\n  {command}\n" in err
    assert frozen.cache_id not in err  # the frozen cache is neither offered nor used
    assert not run.exists() or {p.name for p in run.iterdir()} <= {"config.json"}

    # The printed command (run here, in-process) makes the cache that training needs.
    assert extract_main(shlex.split(command)[2:]) == 0
    samples = read_manifest(manifest)
    config = _train_config(manifest, tmp_path, adapter=str(adapter))
    path, signature = ensure_cache(config, sample_keys(samples), samples)
    assert path.stem != frozen.cache_id and signature["adapter_sha256"] is not None


def test_a_cache_with_a_tampered_signature_is_not_read(tmp_path):
    manifest = make_dataset(tmp_path / "d", 6, size=32)
    summary = _extract(manifest, tmp_path / "cache")
    metadata = summary.path / "zarr.json"
    document = json.loads(metadata.read_text())
    document["attributes"]["signature"]["versions"]["torch"] = "1.0.0"  # made elsewhere
    metadata.write_text(json.dumps(document))
    files = _files(summary.path)

    with pytest.raises(CacheError, match="will not be used"):
        train(_train_config(manifest, tmp_path))
    assert not (tmp_path / "run").exists()
    with pytest.raises(CacheError, match="will not be used"):  # nor written into
        train(_train_config(manifest, tmp_path, extract_missing=True))
    with pytest.raises(CacheError, match=r"1\.0\.0.*will not be used"):
        _extract(manifest, tmp_path / "cache")
    assert _files(summary.path) == files


# ------------------------------------------------------------------ lost chunks, keys and flags


def test_a_deleted_chunk_is_not_done_a_read_error_and_extracted_again(tmp_path):
    manifest = make_dataset(tmp_path / "d", 6, size=32)
    summary = _extract(manifest, tmp_path / "cache")
    cache = FeatureCache.open(summary.path)
    before = _features_by_key(cache)
    victim = read_manifest(manifest)[1]
    key = sample_keys([victim])[0]
    row = int(cache.rows_for([key])[0])
    (summary.path / f"features/1x/c/{row}/0/0/0").unlink()
    assert not FeatureCache.open(summary.path).done()[row]
    with pytest.raises(CacheError, match=rf"chunk of row {row} is missing"):
        FeatureCache.open(summary.path).read(row, strict=True)
    with pytest.raises(MissingFeaturesError) as info:  # training names the image, not zeros
        train(_train_config(manifest, tmp_path))
    assert f"lacks 1 of 6 images ({victim.image})" in str(info.value)
    redo = _extract(manifest, tmp_path / "cache")
    assert (redo.extracted, redo.reused) == (1, 5)  # today: extracted 0, reused 6
    after = _features_by_key(FeatureCache.open(summary.path))
    for k, value in after.items():
        np.testing.assert_array_equal(value, before[k])


def _other_order(manifest, tmp_path):
    from pipeline.data.manifest import write_manifest

    rows = read_manifest(manifest)[::-1]
    return write_manifest(tmp_path / "reversed.csv", [
        {"image": s.image, "mask": s.mask, "view": s.view, "split": s.split} for s in rows])


def test_lost_keys_are_named_repaired_and_never_reused(tmp_path, capsys):
    manifest = make_dataset(tmp_path / "d", 6, size=32)
    summary = _extract(manifest, tmp_path / "cache")
    other = make_dataset(tmp_path / "e", 2, size=32, seed=5)
    _extract(other, tmp_path / "cache", levels=("1x", "2x"))  # a second, healthy cache
    (summary.path / "keys/c/0").unlink()
    reordered = _other_order(manifest, tmp_path)
    with pytest.raises(CacheError) as info:  # today: "reused 6", every row the wrong image
        _extract(reordered, tmp_path / "cache")
    assert "keys/c/0: keys chunk lost" in str(info.value)
    assert f"verify {summary.cache_id} --repair --cache-dir {summary.path.parent}" in str(
        info.value)
    capsys.readouterr()
    assert cache_cli(["--cache-dir", str(tmp_path / "cache"), "list"]) == 1
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == 2 and any("DAMAGED" in line and summary.cache_id in line
                                    for line in listed)
    assert cache_cli(["--cache-dir", str(tmp_path / "cache"), "verify", summary.cache_id,
                      "--repair"]) == 0
    assert "keys chunk" in capsys.readouterr().out
    redo = _extract(reordered, tmp_path / "cache")
    assert (redo.extracted, redo.reused) == (6, 0)
    cache, samples = FeatureCache.open(summary.path), read_manifest(manifest)
    with torch.inference_mode():
        backbone = build_backbone("tiny")
        for sample, key in zip(samples, sample_keys(samples), strict=True):
            live = backbone.forward_image(load_preprocessed(sample.image, 252)[None])
            np.testing.assert_allclose(cache.read(int(cache.rows_for([key])[0]))["1x"],
                                       live["vision_features"][0].numpy(), rtol=1e-3, atol=2e-3)


def test_a_truncated_keys_or_done_chunk_is_named_and_repaired(tmp_path, capsys):
    manifest = make_dataset(tmp_path / "d", 4, size=32)
    summary = _extract(manifest, tmp_path / "cache")
    done_chunk = summary.path / "done/c/2"
    done_chunk.write_bytes(done_chunk.read_bytes()[:-2])
    with pytest.raises(CacheError, match=r"done flags of 1 row\(s\) unreadable \(rows \[2\]\)"):
        _extract(manifest, tmp_path / "cache")
    keys = summary.path / "keys/c/0"
    keys.write_bytes(keys.read_bytes()[:-3])
    with pytest.raises(CacheError, match=r"keys unreadable .*--repair"):
        _extract(manifest, tmp_path / "cache")
    capsys.readouterr()
    assert cache_cli(["--cache-dir", str(tmp_path / "cache"), "verify", summary.cache_id,
                      "--repair"]) == 0
    out = capsys.readouterr().out
    assert "keys chunk" in out and "damaged" in out
    redo = _extract(manifest, tmp_path / "cache")
    assert (redo.extracted, redo.reused) == (4, 0)
    assert cache_cli(["--cache-dir", str(tmp_path / "cache"), "verify", summary.cache_id]) == 0


def test_a_killed_cache_creation_leaves_nothing_behind(tmp_path):
    manifest = make_dataset(tmp_path / "d", 2, size=32)
    from pipeline.extraction import cache_signature

    config = ExtractConfig(data=str(manifest), backbone="tiny", cache_dir=str(tmp_path / "c"),
                           device="cpu")
    name = f"{cache_signature(config).get('backbone')}"
    from pipeline.cache.store import cache_path

    path = cache_path(tmp_path / "c", cache_signature(config))
    leftover = path.with_name(f".{path.name}.creating-4242")  # what a SIGKILL there leaves
    (leftover / "keys").mkdir(parents=True)
    _extract(manifest, tmp_path / "c")
    assert not leftover.exists() and name in path.name and path.is_dir()


def test_training_while_another_run_extracts_offers_no_missing_flag(tmp_path):
    from pipeline.cache.store import cache_path, writer_lock
    from pipeline.extraction import cache_signature

    manifest = make_dataset(tmp_path / "d", 4, size=32)
    config = _train_config(manifest, tmp_path, extract_missing=True)
    path = cache_path(config.cache_dir, cache_signature(config.extract_config()))
    with writer_lock(path), pytest.raises(CacheError) as info:
        ensure_cache(config, sample_keys(read_manifest(manifest)), read_manifest(manifest))
    assert "--wait" not in str(info.value) and "run this command again" in str(info.value)


def test_cache_rm_refuses_a_cache_a_training_reads(tmp_path):
    from conftest import validated_past

    manifest = make_dataset(tmp_path / "d", 6, size=32)
    run, cache_dir = tmp_path / "run", tmp_path / "cache"
    training = subprocess.Popen(
        [sys.executable, str(REPO / "train_head.py"), "--data", str(manifest), "--backbone",
         "tiny", "--cache-dir", str(cache_dir), "--extract-missing", "--run-dir", str(run),
         "--steps", "100000", "--val-every", "2", "--batch-size", "2", "--loader-workers", "0",
         "--device", "cpu"], env=subprocess_env(), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not validated_past(run, 2):
            time.sleep(0.05)
        (cache,) = cache_dir.glob("*.zarr")

        def rm():
            return subprocess.run([sys.executable, "-m", "pipeline.cache", "--cache-dir",
                                   str(cache_dir), "rm", cache.stem], cwd=REPO,
                                  env=subprocess_env(), capture_output=True, text=True,
                                  timeout=120)

        refused = rm()
        assert refused.returncode == 1 and refused.stderr.splitlines() == [
            f"error: cache {cache.name} is in use: a running `sam3-vessel train` reads it (it "
            f"holds {cache.stem}.readers); let it finish or stop it, then run `cache rm` again"]
        assert (cache / "zarr.json").is_file() and training.poll() is None
    finally:
        os.killpg(training.pid, signal.SIGKILL)
        training.wait()
    removed = rm()  # the kernel released the dead training's lock
    assert removed.returncode == 0, removed.stderr
    assert not cache.exists() and not cache.with_suffix(".readers").exists()
