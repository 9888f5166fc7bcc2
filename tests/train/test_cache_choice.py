"""`--cache ID_OR_PATH`: Stage B reads backbone, levels, amp and the cache folder from the
cache's signature; flags given as well must agree, and the checkpoint must match its digest."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest
from conftest import REPO, subprocess_env

from pipeline.cache.store import FeatureCache, UnknownCacheError
from pipeline.config import ExtractConfig, TrainConfig
from pipeline.data.manifest import read_manifest, sample_keys
from pipeline.errors import UsageError
from pipeline.extraction import run_extraction
from pipeline.train.cache_choice import CacheMismatchError, check_agrees, from_cache


def _extract(manifest, cache_dir):
    config = ExtractConfig(data=str(manifest), backbone="tiny", cache_dir=str(cache_dir),
                           levels=("1x", "2x"), loader_workers=0, device="cpu")
    samples = read_manifest(manifest)
    return run_extraction(config, samples, sample_keys(samples))


def test_the_signature_gives_backbone_levels_amp_and_folder(dataset, tmp_path):
    summary = _extract(dataset, tmp_path / "cache")
    config = TrainConfig(data=str(dataset), cache=summary.cache_id,
                         cache_dir=str(tmp_path / "cache"), device="cpu")
    read = from_cache(config, given={"data", "cache", "cache_dir"})
    assert (read.backbone, read.levels, read.amp, read.cache_block) == ("tiny", ("1x", "2x"),
                                                                        "off", None)
    assert read.cache_dir == str((tmp_path / "cache").resolve())
    # A path works from anywhere: the folder comes from the path, not --cache-dir.
    by_path = from_cache(TrainConfig(data=str(dataset), cache=str(summary.path), device="cpu"),
                         given={"data", "cache"})
    assert by_path == replace(read, cache=str(summary.path))


def test_flags_given_as_well_must_agree(dataset, tmp_path):
    summary = _extract(dataset, tmp_path / "cache")
    common = dict(data=str(dataset), cache=summary.cache_id, cache_dir=str(tmp_path / "cache"),
                  device="cpu")
    agreeing = from_cache(TrainConfig(**common, backbone="tiny", levels=("2x", "1x")),
                          given={"backbone", "levels"})
    assert agreeing.levels == ("1x", "2x")
    with pytest.raises(CacheMismatchError, match=r"--levels 1x disagrees with --cache "
                       rf"{summary.cache_id}, whose features were made with levels 1x,2x"):
        from_cache(TrainConfig(**common, levels=("1x",)), given={"levels"})
    with pytest.raises(CacheMismatchError, match="--backbone sam3 disagrees"):
        from_cache(TrainConfig(**common, backbone="sam3"), given={"backbone"})
    assert issubclass(CacheMismatchError, UsageError)
    with pytest.raises(UnknownCacheError, match="no cache 'tiny-000000000000'"):
        from_cache(TrainConfig(**{**common, "cache": "tiny-000000000000"}), given=set())


def test_a_checkpoint_that_gives_other_features_is_refused(dataset, tmp_path):
    summary = _extract(dataset, tmp_path / "cache")
    config = TrainConfig(data=str(dataset), cache=summary.cache_id,
                         cache_dir=str(tmp_path / "cache"), device="cpu")
    made = FeatureCache.open(summary.path).signature
    check_agrees(config, made)  # the cache's own signature agrees
    with pytest.raises(CacheMismatchError, match=r"made with checkpoint_sha256 None, but this "
                       r"run's flags give 0{64} \(--checkpoint\)"):
        check_agrees(config, {**made, "checkpoint_sha256": "0" * 64})


def test_train_head_trains_on_the_named_cache_without_repeating_its_flags(dataset, tmp_path):
    summary = _extract(dataset, tmp_path / "cache")
    run = tmp_path / "run"
    # No --backbone (its default is sam3, which needs weights): the cache says tiny.
    out = subprocess.run(
        [sys.executable, str(REPO / "train_head.py"), "--data", str(dataset), "--cache",
         str(summary.path), "--run-dir", str(run), "--steps", "2", "--batch-size", "2",
         "--e2e-every", "0", "--loader-workers", "0", "--device", "cpu", "--overlays", "0"],
        env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    saved = json.loads((run / "config.json").read_text())
    assert saved["config"]["backbone"] == "tiny" and saved["config"]["levels"] == ["1x", "2x"]
    assert saved["cache"]["id"] == summary.cache_id
    refused = subprocess.run(
        [sys.executable, str(REPO / "train_head.py"), "--data", str(dataset), "--cache",
         str(summary.path), "--levels", "1x", "--run-dir", str(tmp_path / "other"),
         "--device", "cpu"], env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2
    assert refused.stderr.splitlines()[-1].startswith("error: --levels 1x disagrees with")
    # Resumed with the same cache named by its id (and folder) instead of the path it was given
    resumed = subprocess.run(
        [sys.executable, str(REPO / "train_head.py"), "--resume", str(run), "--cache",
         summary.cache_id, "--cache-dir", str(tmp_path / "cache"), "--steps", "3"],
        env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run / "config.json").read_text())["config"]["steps"] == 3
