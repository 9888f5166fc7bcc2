"""A synthetic, view-conditioned vessel dataset, generated deterministically on first use.

`ensure_demo(root)` writes 96 images of 320x320 (24 per view `LAO`, `RAO`, `AP`, `LAT`; 18
`train` and 6 `val` each) with binary masks and a manifest. Every image shows a few vessel trees
(roots that branch recursively, random-walk curvature, radii tapering from ~3 px to ~0.5 px) drawn
darker than a textured background. Each view has its own dominant vessel orientation, brightness,
contrast and texture scale; `LAT` is saved tinted RGB, the others grayscale.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import distance_transform_edt, gaussian_filter
from scipy.signal import lfilter

from pipeline.data.manifest import Sample, read_manifest, write_manifest

SIZE = 320
PER_VIEW = 24
TRAIN_PER_VIEW = 18
SEED = 20240917
STEP = 0.5  # px between centreline samples
RADII = np.arange(0.5, 3.01, 0.5)  # radius levels drawn, px
STALE_S = 600.0  # a temporary folder untouched this long is a dead generation's leftover


@dataclass(frozen=True)
class View:
    angle: float  # dominant vessel direction, degrees (image x right, y down)
    background: float  # mean background grey level, 0-255
    contrast: float  # grey levels removed at a thick vessel's centre
    texture: float  # sigma (px) of the low-frequency background noise
    tint: tuple[float, float, float] | None = None  # RGB gains; None saves grayscale "L"


VIEWS = {
    "LAO": View(angle=45.0, background=165.0, contrast=70.0, texture=8.0),
    "RAO": View(angle=135.0, background=140.0, contrast=55.0, texture=20.0),
    "AP": View(angle=90.0, background=185.0, contrast=85.0, texture=40.0),
    "LAT": View(angle=0.0, background=150.0, contrast=62.0, texture=14.0,
                tint=(1.0, 0.86, 0.70)),
}


def ensure_demo(root: str | Path) -> Path:
    """Generate the demo dataset under `root` if `root/manifest.csv` is missing; return its path.

    Everything is written into a temporary sibling folder and renamed into place, the manifest
    last, so a killed generation never leaves a folder that has a manifest but missing files.
    """
    root = Path(root)
    manifest = root / "manifest.csv"
    if manifest.is_file():
        return manifest
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(root)
    if root.is_dir():
        _refuse_foreign(root)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _generate(tmp)
        _install(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _remove_stale(root: Path) -> None:
    """Delete temporary folders of earlier generations of `root` left untouched for STALE_S."""
    for leftover in root.parent.glob(f".{root.name}.tmp-*"):
        try:
            if time.time() - leftover.stat().st_mtime > STALE_S:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass


def _refuse_foreign(root: Path) -> None:
    """Raise if `root` holds non-empty images/ or masks/ that no manifest vouches for."""
    for name in ("images", "masks"):
        target = root / name
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise FileExistsError(f"{target}: exists without {root / 'manifest.csv'}; "
                                  "remove it or choose another demo folder")


def _install(tmp: Path, root: Path) -> None:
    """Move the finished dataset in `tmp` to `root`: one rename if `root` is absent or empty,
    else images/ and masks/ moved in, then the manifest (the completion mark) last.
    """
    if (root / "manifest.csv").is_file():
        return  # a concurrent generation finished first
    try:
        tmp.rename(root)  # atomic; also replaces an empty `root` folder
        return
    except OSError:
        if (root / "manifest.csv").is_file():
            return  # lost a race with a concurrent generation
        if not root.is_dir():
            raise
    _refuse_foreign(root)
    for name in ("images", "masks"):
        if (root / name).exists():
            (root / name).rmdir()
        (tmp / name).rename(root / name)
    (tmp / "manifest.csv").replace(root / "manifest.csv")


def _generate(folder: Path) -> None:
    """Write images/, masks/ and manifest.csv (relative paths) into `folder`."""
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    jobs = [(v, name, i) for v, name in enumerate(VIEWS) for i in range(PER_VIEW)]
    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:  # numpy/scipy/PIL drop the GIL
        rows = list(pool.map(lambda job: _write_sample(folder, *job), jobs))
    write_manifest(folder / "manifest.csv", rows)


def _write_sample(folder: Path, view_index: int, name: str, index: int) -> dict:
    """Render sample `index` of view `name` (own seeded generator), save it; its manifest row."""
    image, mask = render_sample(VIEWS[name], np.random.default_rng([SEED, view_index, index]))
    stem = f"{name}_{index:02d}.png"
    Image.fromarray(image, "RGB" if image.ndim == 3 else "L").save(
        folder / "images" / stem, compress_level=1)
    Image.fromarray(mask, "L").save(folder / "masks" / stem)
    return {"image": folder / "images" / stem, "mask": folder / "masks" / stem,
            "view": name, "split": "train" if index < TRAIN_PER_VIEW else "val"}


def render_sample(view: View, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One sample: image (SIZE, SIZE) uint8, or (SIZE, SIZE, 3) uint8 for a tinted view, and
    mask (SIZE, SIZE) uint8 with 0 (background) / 255 (vessel).
    """
    for _ in range(8):  # redraw the rare trees that leave the frame or cover too much of it
        xs, ys, rs = _forest(rng, np.deg2rad(view.angle))
        darkness, mask = _rasterize(xs, ys, rs)
        if 0.04 <= mask.mean() <= 0.20:
            break
    grey = _background(rng, view) - view.contrast * darkness
    if view.tint is not None:
        grey = grey[..., None] * np.asarray(view.tint, dtype=np.float32)
    image = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    return image, mask.astype(np.uint8) * 255


def _forest(rng: np.random.Generator, angle: float) -> tuple[np.ndarray, ...]:
    """Centreline samples of 3-4 trees entering from the side facing away from `angle` (radians):
    x, y, radius, each (N,) float64 in pixels.
    """
    direction = np.array([np.cos(angle), np.sin(angle)])
    across = np.array([-direction[1], direction[0]])
    parts: list[np.ndarray] = []
    for _ in range(rng.integers(3, 5)):
        start = SIZE / 2 - direction * (SIZE * 0.55) + across * rng.uniform(-0.35, 0.35) * SIZE
        _branch(rng, parts, start, angle + rng.normal(0.0, 0.2), rng.uniform(2.4, 3.1),
                rng.uniform(260.0, 380.0), depth=int(rng.integers(3, 5)))
    xs, ys, rs = np.concatenate(parts, axis=1)
    return xs, ys, rs


def _branch(rng: np.random.Generator, parts: list[np.ndarray], start: np.ndarray, heading: float,
            radius: float, length: float, depth: int) -> None:
    """Append one branch, (3, n) rows x, y, radius, to `parts`, then its children recursively.

    The heading wanders as an AR(1) process around its initial value (smooth curvature); the
    radius tapers linearly to about 55 % of its start.
    """
    n = max(int(length / STEP), 8)
    wander = lfilter([1.0], [1.0, -0.97], rng.normal(0.0, 0.035, n))
    headings = heading + wander
    xs = start[0] + np.cumsum(STEP * np.cos(headings))
    ys = start[1] + np.cumsum(STEP * np.sin(headings))
    radii = np.linspace(radius, max(0.55 * radius, 0.5), n)
    parts.append(np.stack([xs, ys, radii]))
    if depth == 0:
        return
    for _ in range(rng.integers(1, 4)):
        at = int(rng.integers(n // 6, 5 * n // 6))
        child_radius = radii[at] * rng.uniform(0.5, 0.8)
        if child_radius < 0.5:
            continue
        turn = rng.choice([-1.0, 1.0]) * rng.uniform(0.35, 0.9)
        _branch(rng, parts, np.array([xs[at], ys[at]]), headings[at] + turn, child_radius,
                length * rng.uniform(0.35, 0.6), depth - 1)


def _rasterize(xs: np.ndarray, ys: np.ndarray, rs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Draw centreline samples as tubes: darkness (SIZE, SIZE) float32 in [0, 1] with soft,
    blurred edges (thin vessels fainter), and mask (SIZE, SIZE) bool, distance <= radius.

    Radii are snapped to RADII; each level is one distance transform to its centreline pixels.
    """
    col, row = np.rint(xs).astype(int), np.rint(ys).astype(int)
    level = np.clip(np.rint((rs - RADII[0]) / (RADII[1] - RADII[0])), 0, len(RADII) - 1)
    inside = (col >= 0) & (col < SIZE) & (row >= 0) & (row < SIZE)
    col, row, level = col[inside], row[inside], level[inside].astype(int)
    darkness = np.zeros((SIZE, SIZE), np.float32)
    mask = np.zeros((SIZE, SIZE), bool)
    for k in np.unique(level):
        radius, pad = RADII[k], int(RADII[k]) + 2
        r, c = row[level == k], col[level == k]
        top, left = max(r.min() - pad, 0), max(c.min() - pad, 0)  # EDT on the level's bbox only
        box = np.s_[top:min(r.max() + pad + 1, SIZE), left:min(c.max() + pad + 1, SIZE)]
        background = np.ones(mask[box].shape, bool)
        background[r - top, c - left] = False
        distance = distance_transform_edt(background).astype(np.float32)
        mask[box] |= distance <= radius
        profile = np.sqrt(np.clip(1.0 - (distance / (radius + 0.75)) ** 2, 0.0, 1.0))
        np.maximum(darkness[box], profile * (0.55 + 0.45 * radius / RADII[-1]), out=darkness[box])
    return gaussian_filter(darkness, 0.6), mask


def _background(rng: np.random.Generator, view: View) -> np.ndarray:
    """Textured background, (SIZE, SIZE) float32 grey levels: the view's mean level, smooth
    noise at the view's texture scale (std 14), a faint linear shading and fine noise (std 4).
    """
    freq = np.hypot(np.fft.fftfreq(SIZE)[:, None], np.fft.rfftfreq(SIZE)[None, :])
    blur = np.exp(-2.0 * (np.pi * view.texture * freq) ** 2)  # Gaussian filter, periodic
    smooth = np.fft.irfft2(np.fft.rfft2(rng.normal(size=(SIZE, SIZE))) * blur, (SIZE, SIZE))
    smooth *= 14.0 / max(float(smooth.std()), 1e-6)
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE - 0.5
    tilt = rng.normal(0.0, 12.0, 2)
    fine = rng.normal(0.0, 4.0, (SIZE, SIZE))
    return (view.background + smooth + tilt[0] * x + tilt[1] * y + fine).astype(np.float32)


def resolve_data(data: str, cache_dir: str | Path) -> list[Sample]:
    """`--data`: a manifest path, or `demo` (made under `<cache-dir>/demo-data` on first use)."""
    return read_manifest(data_manifest(data, cache_dir))


def data_manifest(data: str, cache_dir: str | Path) -> Path:
    """The absolute manifest path that `--data` names (`demo`: made on first use)."""
    if data == "demo":
        return Path(ensure_demo(Path(cache_dir) / "demo-data")).resolve()
    return Path(data).resolve()
