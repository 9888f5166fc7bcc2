"""Shared fixtures: small real image datasets and tiny-backbone configurations."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.manifest import write_manifest

REPO = Path(__file__).resolve().parents[1]


def make_dataset(folder: Path, n: int, *, seed: int = 0, size: int = 64, start: int = 0,
                 views=("LAO", "RAO")) -> Path:
    """n random grayscale PNG images with line masks, half train, half val; returns manifest."""
    rng = np.random.default_rng(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    (folder / "mask").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(start, start + n):
        image = rng.integers(0, 255, (size, size), dtype=np.uint8)
        mask = np.zeros((size, size), np.uint8)
        mask[:, size // 3 + i % 5] = 255
        image[mask > 0] //= 3
        Image.fromarray(image).save(folder / "img" / f"{i:03d}.png")
        Image.fromarray(mask).save(folder / "mask" / f"{i:03d}.png")
        rows.append({"image": folder / "img" / f"{i:03d}.png",
                     "mask": folder / "mask" / f"{i:03d}.png", "view": views[i % len(views)],
                     "split": "val" if i % 4 == 3 or i % 6 == 2 else "train"})
    return write_manifest(folder / "manifest.csv", rows)


@pytest.fixture
def dataset(tmp_path) -> Path:
    return make_dataset(tmp_path / "data", 6)


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch, tmp_path):
    """No test reaches the Hugging Face hub, and digests are memoised under tmp_path."""
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def run_records(run_dir: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    import json

    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def validated_past(run_dir: Path, step: int) -> bool:
    """Whether a (possibly still running) run has written a val record at `step` or later."""
    import json

    try:
        return any(r["step"] >= step and r["split"] == "val" for r in run_records(run_dir))
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def sigkill_after_validation(command: list, run_dir: Path, step: int, env: dict) -> None:
    """Start a training `command`, SIGKILL its process group once `run_dir` has validated at
    `step` and saved last.pt (renamed into place after the val line), and check the kill landed
    before the run's end."""
    import signal
    import subprocess
    import time

    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and not (validated_past(run_dir, step)
                                          and (run_dir / "last.pt").exists()):
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (run_dir / "report.json").exists(), "the kill should land before the end"


def as_typed_at_a_terminal() -> None:
    """Popen's `preexec_fn` for a child that gets Ctrl-C: SIGINT at its default, as a command
    typed at a terminal has it. A suite started in the background (`pytest &` in a script, as
    CI may) has SIGINT ignored, which its children inherit, and Python then ignores Ctrl-C."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def subprocess_env() -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return env


def finished_done_chunks(cache_dir: Path) -> int:
    """How many samples a running extraction has marked done in `cache_dir`'s caches.

    zarr writes a chunk to `<chunk>.<uuid>.partial` and renames it into place, so only the
    renamed files count."""
    return sum(not p.name.endswith(".partial") for p in Path(cache_dir).glob("*.zarr/done/c/*"))
