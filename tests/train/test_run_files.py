"""One run per run directory, and a resume that trains on exactly the run's own data."""

import json
import re
import shutil

import pytest
from conftest import make_dataset

from pipeline.config import TrainConfig
from pipeline.data.manifest import read_manifest, write_manifest
from pipeline.train.launch import train
from pipeline.train.run_files import RunDirError


def _config(manifest, tmp_path, **kw) -> TrainConfig:
    values = dict(data=str(manifest), backbone="tiny", cache_dir=str(tmp_path / "cache"),
                  run_dir=str(tmp_path / "run"), epochs=1, batch_size=4, e2e_every=0,
                  loader_workers=0, overlays=0, device="cpu", extract_missing=True)
    values.update(kw)
    return TrainConfig(**values)


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A one-epoch run whose manifest is given by a path relative to its working folder."""
    root = tmp_path_factory.mktemp("finished")
    make_dataset(root / "data", 8, size=32)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        run = train(_config("data/manifest.csv", root, cache_dir="cache", run_dir="run"))
    return root, root / run


def _copy(finished, tmp_path):
    root, run = finished
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run", root


def test_a_second_run_into_the_same_directory_is_refused_unless_overwrite(finished, tmp_path):
    run, root = _copy(finished, tmp_path)
    config = _config(root / "data/manifest.csv", root, run_dir=str(run))
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(RunDirError, match=rf"{run} already holds a run .*--resume {run}.*"
                                          "--overwrite"):
        train(config)
    assert (run / "metrics.jsonl").read_text() == before  # today: epochs 1, 1
    (run / "notes.txt").write_text("mine")
    train(_config(root / "data/manifest.csv", root, run_dir=str(run), overwrite=True))
    assert [(r["epoch"], r["split"]) for r in _records(run)] == [(1, "train"), (1, "val")]
    assert (run / "notes.txt").read_text() == "mine"  # only the run's own files go


def test_resume_uses_the_recorded_data_and_a_moved_cache_and_extends_epochs(finished, tmp_path,
                                                                              monkeypatch):
    run, root = _copy(finished, tmp_path)
    saved = json.loads((run / "config.json").read_text())["config"]
    assert saved["data"] == str(root / "data/manifest.csv")  # absolute, whatever the cwd
    moved = tmp_path / "moved-cache"
    shutil.copytree(root / "cache", moved)
    elsewhere = tmp_path / "elsewhere"
    make_dataset(elsewhere / "data", 3, size=32, seed=9)  # another data/manifest.csv
    monkeypatch.chdir(elsewhere)
    shutil.rmtree(root / "cache")  # the cache moved
    try:
        train(TrainConfig(resume=str(run), epochs=2, cache_dir=str(moved)),
              given={"epochs": 2, "cache_dir": str(moved)})
    finally:
        shutil.copytree(moved, root / "cache")
    records = _records(run)
    assert [(r["epoch"], r["split"]) for r in records] == [
        (1, "train"), (1, "val"), (2, "train"), (2, "val")]  # today: --epochs ignored
    n_val = sum(s.split == "val" for s in read_manifest(root / "data/manifest.csv"))
    assert sum(v["n"] for v in records[3]["per_view"].values()) == n_val


def test_resume_refuses_other_flags_by_name(finished, tmp_path):
    run, _ = _copy(finished, tmp_path)
    default = re.escape(str(TrainConfig.__dataclass_fields__["lr"].default))
    with pytest.raises(RunDirError, match=rf"--lr 0\.5 \(the run has {default}\).*only "
                                          "--cache-dir, --epochs, .*--steps"):
        train(TrainConfig(resume=str(run), lr=0.5), given={"lr": 0.5})


@pytest.mark.parametrize("change", ["view", "split", "rows"])
def test_resume_refuses_a_changed_manifest_naming_the_change(finished, tmp_path, change):
    run, root = _copy(finished, tmp_path)
    manifest = root / "data/manifest.csv"
    original = manifest.read_text()
    rows = [{"image": s.image, "mask": s.mask, "view": s.view, "split": s.split}
            for s in read_manifest(manifest)]
    if change == "view":
        rows = [{**r, "view": "LAO-renamed" if r["view"] == "LAO" else r["view"]} for r in rows]
    elif change == "split":
        rows = [{**r, "split": "train"} if r["split"] == "val" and i < 3 else r
                for i, r in enumerate(rows)]
    else:
        rows = rows[:-1]
    expected = {"view": "views changed", "split": "splits changed", "rows": "1 images removed"}
    write_manifest(manifest, rows)
    try:
        with pytest.raises(RunDirError, match=rf"changed since the run started: .*"
                                              rf"{expected[change]}"):
            train(TrainConfig(resume=str(run), epochs=2), given={"epochs": 2})
    finally:
        manifest.write_text(original)


def test_resume_without_last_pt_says_what_to_do(finished, tmp_path):
    run, _ = _copy(finished, tmp_path)
    (run / "last.pt").unlink()
    with pytest.raises(RunDirError, match=r"last\.pt does not exist: .*--overwrite"):
        train(TrainConfig(resume=str(run)))


def test_resume_stretches_the_schedule_and_records_the_new_budget(finished, tmp_path, capsys):
    from pipeline.runs import load_run
    from pipeline.train.steps import lr_factor, warmup_steps

    run, _ = _copy(finished, tmp_path)
    assert _records(run)[-1]["step"] == 2  # one epoch of 5 images at batch 4
    best = max(r["dice"] for r in _records(run) if r["split"] == "val")  # periodic, unmirrored
    capsys.readouterr()
    train(TrainConfig(resume=str(run), steps=4), given={"steps": 4})
    assert (f"resuming {run} at step 2 of 4: 2 steps left; best val Dice so far {best:.3f} "
            "(step 2)") in capsys.readouterr().out
    train(TrainConfig(resume=str(run)), given={})  # a finished run: says what a resume redoes
    assert (f"resuming {run} at step 4 of 4: every step is done: only the final scoring and the "
            "report are redone") in capsys.readouterr().out
    config = TrainConfig()
    resumed = [r for r in _records(run) if r["split"] == "train" and r["step"] == 3]
    # The first resumed step at the stretched schedule's rate, not the old one's end (0.0)
    assert resumed[0]["lr"] == pytest.approx(config.lr * lr_factor(2, 4, warmup_steps(
        4, config.warmup)))
    assert resumed[0]["lora_lr"] == pytest.approx(config.lora_lr * lr_factor(2, 4, warmup_steps(
        4, config.warmup)))
    saved = json.loads((run / "config.json").read_text())["config"]
    assert (saved["steps"], saved["epochs"], saved["resume"]) == (4, None, None)
    compared = load_run(run)
    assert (compared.settings["steps"], compared.finished) == (4, True)


def test_resume_refuses_a_budget_below_the_runs_step(finished, tmp_path):
    run, _ = _copy(finished, tmp_path)
    before = (run / "config.json").read_text()
    with pytest.raises(RunDirError) as raised:
        train(TrainConfig(resume=str(run), steps=1), given={"steps": 1})
    assert str(raised.value) == (
        f"--resume {run}: the run is at step 2 (last.pt), past the --steps 1 asked for; give "
        "--steps above 2 to continue it, or start a new run")
    assert (run / "config.json").read_text() == before and (run / "report.json").is_file()
