"""The synthetic demo dataset: layout, determinism, content, view differences, atomic creation."""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter, sobel

from pipeline.data import demo
from pipeline.data.images import read_image, read_mask
from pipeline.data.manifest import read_manifest

VIEWS = ("LAO", "RAO", "AP", "LAT")


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    """One generation shared by the read-only tests: the manifest path."""
    return demo.ensure_demo(tmp_path_factory.mktemp("shared") / "demo")


@pytest.fixture
def small(monkeypatch) -> int:
    """Shrink the dataset to 2 samples per view for the tests of how it is installed: rows."""
    monkeypatch.setattr(demo, "PER_VIEW", 2)
    monkeypatch.setattr(demo, "TRAIN_PER_VIEW", 1)
    return 2 * len(VIEWS)


def _files(root: Path) -> dict[str, bytes]:
    """Every file under `root`: relative path -> bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _orientation(mask: np.ndarray) -> float:
    """Dominant vessel direction of a (H, W) bool mask, degrees in [0, 180) (structure tensor)."""
    smooth = gaussian_filter(mask.astype(float), 1.5)
    z = ((sobel(smooth, 1) + 1j * sobel(smooth, 0)) ** 2).sum()  # doubled gradient angle
    return float((np.degrees(np.angle(z)) / 2 + 90) % 180)


def _axial_gap(a: float, b: float) -> float:
    gap = abs(a - b) % 180
    return min(gap, 180 - gap)


def test_manifest_layout(generated):
    root = generated.parent
    assert generated == root / "manifest.csv"
    samples = read_manifest(generated)
    assert len(samples) == 96
    assert Counter(s.view for s in samples) == {v: 24 for v in VIEWS}
    assert Counter(s.split for s in samples) == {"train": 72, "val": 24}
    for view in VIEWS:
        assert Counter(s.split for s in samples if s.view == view) == {"train": 18, "val": 6}
    for s in samples:
        assert s.image.is_file() and s.mask.is_file()
        assert s.image.parent == (root / "images").resolve()
        assert s.mask.parent == (root / "masks").resolve()
    assert "images/" in generated.read_text()  # stored relative, so the folder can move
    assert len({s.image for s in samples}) == 96


def test_deterministic_across_folders(generated, tmp_path):
    other = demo.ensure_demo(tmp_path / "again")
    first, second = _files(generated.parent), _files(other.parent)
    assert len(first) == 2 * 96 + 1
    assert first.keys() == second.keys()
    assert all(first[name] == second[name] for name in first)


def test_images_and_masks_content(generated):
    for s in read_manifest(generated):
        with Image.open(s.image) as image:
            assert image.size == (320, 320)
            assert image.mode == ("RGB" if s.view == "LAT" else "L")
        raw = np.asarray(Image.open(s.mask))
        assert raw.shape == (320, 320) and raw.dtype == np.uint8
        assert set(np.unique(raw).tolist()) == {0, 255}
        mask, _ = read_mask(s.mask)
        assert 0.02 <= mask.mean() <= 0.30, (s.mask, mask.mean())
        grey = read_image(s.image).float().mean(0).numpy()
        assert grey[mask].mean() < grey[~mask].mean() - 10, s.image  # vessels darker


def test_views_differ(generated):
    samples = read_manifest(generated)
    brightness = {v: [] for v in VIEWS}
    hits = 0
    for s in samples:
        image = read_image(s.image).float().numpy()
        brightness[s.view].append(image.mean())
        if s.view == "LAT":  # the tinted view: red > green > blue
            red, green, blue = image.reshape(3, -1).mean(1)
            assert red > green + 5 > blue + 10
        else:
            assert (image[0] == image[1]).all() and (image[1] == image[2]).all()
        angle = _orientation(read_mask(s.mask)[0])
        gaps = {v: _axial_gap(angle, demo.VIEWS[v].angle) for v in VIEWS}
        hits += min(gaps, key=gaps.get) == s.view
    assert hits >= 0.9 * len(samples)  # the dominant orientation identifies the view
    means = sorted(np.mean(b) for b in brightness.values())
    assert min(np.diff(means)) > 5  # each view has its own mean brightness
    assert max(np.std(b) for b in brightness.values()) < min(np.diff(means))


def test_second_call_touches_nothing(generated, monkeypatch):
    root = generated.parent
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    monkeypatch.setattr(demo, "_generate", lambda folder: pytest.fail("regenerated"))
    assert demo.ensure_demo(root) == generated
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before
    assert not list(root.parent.glob(".demo.tmp-*"))


def test_killed_generation_leaves_no_dataset(tmp_path, monkeypatch, small):
    real = demo.render_sample

    def dies_midway(view, rng):
        if view is demo.VIEWS["AP"]:
            raise RuntimeError("killed")
        return real(view, rng)

    monkeypatch.setattr(demo, "render_sample", dies_midway)
    with pytest.raises(RuntimeError, match="killed"):
        demo.ensure_demo(tmp_path / "demo")
    assert not (tmp_path / "demo").exists()
    monkeypatch.setattr(demo, "render_sample", real)
    manifest = demo.ensure_demo(tmp_path / "demo")
    assert len(read_manifest(manifest)) == small


def test_leftover_temporary_folders(tmp_path, small):
    fresh, stale = tmp_path / ".demo.tmp-1-aaaaaaaa", tmp_path / ".demo.tmp-2-bbbbbbbb"
    for leftover in (fresh, stale):
        (leftover / "images").mkdir(parents=True)
        (leftover / "images" / "LAO_00.png").write_bytes(b"half written")
        (leftover / "manifest.csv").write_text("image,mask,view,split\n")
    old = time.time() - 2 * demo.STALE_S
    os.utime(stale, (old, old))
    manifest = demo.ensure_demo(tmp_path / "demo")
    samples = read_manifest(manifest)
    assert len(samples) == small and all(s.image.is_file() for s in samples)
    assert read_image(samples[0].image).shape == (3, 320, 320)
    assert fresh.is_dir()  # may belong to a generation still running
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [fresh.name, "demo"]


def test_existing_folder_without_manifest(tmp_path, small):
    root = tmp_path / "demo"
    (root / "cache").mkdir(parents=True)
    (root / "notes.txt").write_text("keep me")
    manifest = demo.ensure_demo(root)
    assert (root / "notes.txt").read_text() == "keep me" and (root / "cache").is_dir()
    assert len(read_manifest(manifest)) == small
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]
    (root / "manifest.csv").unlink()
    with pytest.raises(FileExistsError, match="images"):  # never overwrites foreign files
        demo.ensure_demo(root)
