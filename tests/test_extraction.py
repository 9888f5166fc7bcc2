import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import REPO, finished_done_chunks, make_dataset, subprocess_env

from pipeline.cache.store import CacheLockedError, FeatureCache, writer_lock
from pipeline.config import ExtractConfig
from pipeline.data.images import load_preprocessed
from pipeline.data.manifest import read_manifest, sample_keys
from pipeline.extraction import (
    ExtractSummary,
    NonFiniteFeaturesError,
    cache_signature,
    run_extraction,
    stored_features,
)
from pipeline.model.backbone import build_backbone
from pipeline.model.lora import attach_lora


def _run(manifest, cache_dir, **overrides):
    config = ExtractConfig(data=str(manifest), backbone="tiny", cache_dir=str(cache_dir),
                           batch_size=2, loader_workers=0,
                           **{"augment_copies": 0, **overrides})  # cache mechanics: no copies
    samples = read_manifest(manifest)
    return run_extraction(config, samples, sample_keys(samples)), config


def _files(path):
    return {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in path.rglob("*") if p.is_file()}


def _saved_adapter(tmp_path, scale=0.5, fill=None):
    model = attach_lora(build_backbone("tiny"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=scale) if fill is None else p.data.fill_(fill)
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


@pytest.mark.parametrize("with_adapter", [False, True])
def test_cached_features_equal_forward_image(dataset, tmp_path, with_adapter):
    adapter = _saved_adapter(tmp_path) if with_adapter else None
    summary, config = _run(dataset, tmp_path / "cache", levels=("1x", "4x"),
                           adapter=str(adapter) if adapter else None)
    cache = FeatureCache.open(summary.path)
    backbone = build_backbone("tiny", adapter=adapter)
    samples = read_manifest(dataset)
    rows = cache.rows_for(sample_keys(samples))
    for sample, row in zip(samples, rows, strict=True):
        with torch.inference_mode():
            out = backbone.forward_image(load_preprocessed(sample.image, 252)[None])
        np.testing.assert_allclose(cache.read(int(row), ["1x"])["1x"],
                                   out["vision_features"][0].numpy(), rtol=1e-3, atol=2e-3)
        np.testing.assert_allclose(cache.read(int(row), ["4x"])["4x"],
                                   out["backbone_fpn"][0][0].numpy(), rtol=1e-3, atol=2e-3)
    assert cache.signature["adapter_sha256"] == (None if adapter is None else
                                                 cache.signature["adapter_sha256"])
    assert (cache.signature["adapter_sha256"] is None) != with_adapter


def test_second_run_extracts_nothing_and_rewrites_no_chunk(dataset, tmp_path):
    first, _ = _run(dataset, tmp_path / "cache")
    assert (first.extracted, first.reused, first.total) == (6, 0, 6)
    before = _files(first.path)
    second, _ = _run(dataset, tmp_path / "cache")
    assert (second.extracted, second.reused) == (0, 6)
    assert _files(first.path) == before


def test_superset_manifest_extracts_only_new_images(tmp_path):
    small = make_dataset(tmp_path / "a", 4)
    first, _ = _run(small, tmp_path / "cache")
    before = _files(first.path / "features")
    bigger = make_dataset(tmp_path / "b", 3, start=4, seed=1)
    rows = read_manifest(small) + read_manifest(bigger)
    from pipeline.data.manifest import write_manifest

    union = write_manifest(tmp_path / "union.csv", [
        {"image": s.image, "mask": s.mask, "view": s.view, "split": s.split} for s in rows])
    second, _ = _run(union, tmp_path / "cache")
    assert (second.extracted, second.reused, second.total) == (3, 4, 7)
    assert second.path == first.path
    after = _files(first.path / "features")
    chunks = [p for p in before if "/c/" in str(p)]
    assert len(chunks) == 4 and all(after[p] == before[p] for p in chunks)
    assert FeatureCache.open(second.path).done().all()


def test_different_signature_gives_a_different_cache(dataset, tmp_path):
    a, _ = _run(dataset, tmp_path / "cache")
    b, _ = _run(dataset, tmp_path / "cache", levels=("1x", "2x"))
    c, _ = _run(dataset, tmp_path / "cache", adapter=str(_saved_adapter(tmp_path)))
    assert len({a.path, b.path, c.path}) == 3
    assert b.extracted == 6 and c.extracted == 6


def test_two_worker_processes_give_the_same_cache(tmp_path):
    manifest = make_dataset(tmp_path / "d", 5)
    one, _ = _run(manifest, tmp_path / "one", workers=1)
    two, _ = _run(manifest, tmp_path / "two", workers=2)
    a, b = zarr.open_group(one.path, mode="r"), zarr.open_group(two.path, mode="r")
    assert list(a["keys"][:]) == list(b["keys"][:])
    assert b["done"][:].all()
    np.testing.assert_array_equal(a["features/1x"][:], b["features/1x"][:])


def test_non_finite_features_name_the_image(dataset, tmp_path):
    adapter = _saved_adapter(tmp_path, fill=float("nan"))
    with pytest.raises(NonFiniteFeaturesError, match=r"img/00\d\.png"):
        _run(dataset, tmp_path / "cache", adapter=str(adapter))


def test_a_second_writer_is_refused(dataset, tmp_path):
    config = ExtractConfig(data=str(dataset), backbone="tiny", cache_dir=str(tmp_path / "c"))
    from pipeline.cache.store import cache_path

    with writer_lock(cache_path(config.cache_dir, cache_signature(config))):
        with pytest.raises(CacheLockedError, match="wait for that run"):
            _run(dataset, tmp_path / "c")


def test_gpus_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="--gpus needs CUDA.*--device cpu --workers N"):
        ExtractConfig(backbone="tiny", gpus=(0, 1))


def _extract_cmd(manifest, cache_dir):
    return [sys.executable, str(REPO / "extract_features.py"), "--data", str(manifest),
            "--backbone", "tiny", "--cache-dir", str(cache_dir), "--batch-size", "1",
            "--loader-workers", "0", "--device", "cpu", "--augment-copies", "0"]


def test_sigkill_then_rerun_completes_with_clean_features(tmp_path):
    manifest = make_dataset(tmp_path / "d", 40, size=96)
    cmd = _extract_cmd(manifest, tmp_path / "cache")
    process = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and done < 3:
        done = finished_done_chunks(tmp_path / "cache")
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    path = next((tmp_path / "cache").glob("*.zarr"))
    partial = FeatureCache.open(path).done()
    assert 0 < partial.sum() < 40, "the kill should land in the middle of the run"
    subprocess.run(cmd, env=subprocess_env(), check=True, capture_output=True)
    clean, _ = _run(manifest, tmp_path / "clean")
    resumed, reference = FeatureCache.open(path), FeatureCache.open(clean.path)
    assert resumed.done().all() and list(resumed.keys()) == list(reference.keys())
    np.testing.assert_array_equal(resumed.level("1x")[:], reference.level("1x")[:])


def test_torchrun_ranks_fill_one_cache(tmp_path):
    manifest = make_dataset(tmp_path / "d", 6)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    result = subprocess.run(
        [torchrun, "--nproc-per-node", "2", *_extract_cmd(manifest, tmp_path / "cache")[1:]],
        env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("extracted 6 rows in ") == 1
    assert "reused 0; the manifest needs 6: 6 images, no augmented copies" in result.stdout
    clean, _ = _run(manifest, tmp_path / "clean")
    path = next((tmp_path / "cache").glob("*.zarr"))
    assert path.name == clean.path.name
    np.testing.assert_array_equal(FeatureCache.open(path).level("1x")[:],
                                  FeatureCache.open(clean.path).level("1x")[:])


def test_stored_features_flag_each_sample_with_a_non_finite_value():
    out = {"1x": torch.randn(5, 4, 3, 3), "4x": torch.randn(5, 4, 12, 12)}
    out["4x"][1, 2, 7, 5] = float("inf")
    out["1x"][2, 0, 0, 0] = float("nan")
    out["4x"][3, 3, 0, 0] = 1e6  # beyond float16: Inf once stored
    out["1x"][4, 1, 1, 1], out["1x"][4, 2, 2, 2] = float("inf"), float("-inf")  # sum: NaN
    out["4x"] = out["4x"].contiguous(memory_format=torch.channels_last)  # as CPU convs give
    half, finite = stored_features(out)
    assert finite.tolist() == [True, False, False, False, False]
    for lvl, h in half.items():
        assert h.dtype == torch.float16 and h.is_contiguous()
        assert torch.equal(h[0], out[lvl][0].half())


def test_the_summary_counts_images_and_copies_and_a_rerun_has_no_rate():
    first = ExtractSummary("tiny-x", Path("cache/tiny-x.zarr"), 384, 0, 384, 1.6, 288, 4)
    assert first.line() == ("extracted 384 rows in 1.6 s (240.0 rows/s), reused 0; the manifest "
                            "needs 384: 96 images + 288 augmented copies (4 of each training "
                            "image, --augment-copies)")
    again = ExtractSummary("tiny-x", Path("cache/tiny-x.zarr"), 0, 96, 96, 0.2)
    assert again.line() == ("nothing to extract: the cache already holds all 96 rows (96 "
                            "images, no augmented copies)")
