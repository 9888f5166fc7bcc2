import csv
import io
import json
import shutil

import pytest
from conftest import make_dataset
from PIL import Image

from pipeline.config import TrainConfig
from pipeline.runs import RunsError, compare, main
from pipeline.train.launch import train


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three real tiny runs on one cache: two learning rates, and a narrower decoder."""
    root = tmp_path_factory.mktemp("runs")
    manifest = make_dataset(root / "data", 6)
    common = dict(data=str(manifest), backbone="tiny", cache_dir=str(root / "cache"), epochs=2,
                  batch_size=4, e2e_every=0, loader_workers=0, overlays=0, extract_missing=True,
                  tensorboard=False, decoder="legacy")  # "narrow": the legacy --width
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("XDG_CACHE_HOME", str(root / "xdg"))
        for name, extra in (("lr-1e-3", dict(lr=1e-3)), ("lr-1e-2", dict(lr=1e-2)),
                            ("narrow", dict(lr=1e-3, width=32))):
            train(TrainConfig(run_dir=str(root / "runs" / name), **common, **extra))
    return root / "runs"


def _best_val(run):
    """The validation record of the best epoch, read from metrics.jsonl (the trainer's choice)."""
    vals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in vals if r["split"] == "val"]
    return max(vals, key=lambda r: r["dice"])


def _rows(text):
    return list(csv.DictReader(io.StringIO(text)))


def test_compare_shows_differing_settings_and_best_scores(runs):
    rows = _rows(compare([str(runs / "*")], csv_out="-"))
    # Best first; equal scores keep the order the glob lists the runs in (names sorted).
    assert [r["run"].rsplit("/", 1)[-1] for r in rows] == sorted(
        sorted(("lr-1e-3", "lr-1e-2", "narrow")), key=lambda n: -_best_val(runs / n)["dice"])
    header = list(rows[0])
    assert header[:5] == ["run", "lr", "width", "finished", "best step"]  # batch_size equal
    for row in rows:
        run = runs / row["run"].rsplit("/", 1)[-1]
        best, config = _best_val(run), json.loads((run / "config.json").read_text())["config"]
        assert float(row["lr"]) == config["lr"] and int(row["width"]) == config["width"]
        assert int(row["best step"]) == best["step"] and row["finished"] == "yes"
        for score in ("dice", "iou", "cldice"):
            assert float(row[score]) == pytest.approx(best[score], rel=1e-12)
            for view in ("LAO", "RAO"):
                assert float(row[f"{view}/{score}"]) == pytest.approx(
                    best["per_view"][view][score], rel=1e-12)


def test_sort_by_a_view_score_and_the_formats(runs, tmp_path, capsys):
    paths = [str(runs / n) for n in ("narrow", "lr-1e-3", "lr-1e-2")]
    rows = _rows(compare(paths, sort="RAO/cldice", csv_out="-"))
    values = [float(r["RAO/cldice"]) for r in rows]
    assert values == sorted(values, reverse=True)
    assert main(["compare", *paths, "--markdown", "--csv", str(tmp_path / "t.csv"),
                 "--plot", str(tmp_path / "curves.png")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| run | lr | width | finished | best step | dice |")
    assert "LAO/" not in out[0]  # per view with --per-view only
    assert out[1].startswith("|---|") and len(out) == 5
    assert len(_rows((tmp_path / "t.csv").read_text())) == 3
    width, height = Image.open(tmp_path / "curves.png").size
    assert 1000 <= width <= 1400 and 800 <= height <= 1100  # 3 x 3 panels: a laptop screen
    assert main(["compare", *paths]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["run", "lr", "width"] and len(table) == 6


def test_a_run_still_training_takes_its_best_from_metrics(runs, tmp_path):
    running = tmp_path / "running"
    shutil.copytree(runs / "lr-1e-3", running)
    (running / "report.json").unlink()
    (row,) = _rows(compare([str(running)], csv_out="-"))
    best = _best_val(running)
    assert row["finished"] == "no" and int(row["best step"]) == best["step"]
    assert float(row["LAO/dice"]) == pytest.approx(best["per_view"]["LAO"]["dice"])
    assert "lr" not in row  # one run: no setting differs


def test_a_stopped_run_is_told_apart_from_one_still_training(runs, tmp_path, capsys):
    stopped, running = tmp_path / "stopped", tmp_path / "running"
    for copy in (stopped, running):
        shutil.copytree(runs / "lr-1e-3", copy)
    (running / "report.json").unlink()
    report = json.loads((stopped / "report.json").read_text())
    report["interrupted"] = {"by": "SIGTERM", "step": 2, "of": 4}  # as a SIGTERM writes it
    (stopped / "report.json").write_text(json.dumps(report))
    rows = {r["run"].rsplit("/", 1)[-1]: r["finished"]
            for r in _rows(compare([str(stopped), str(running)], csv_out="-"))}
    assert rows == {"stopped": "stopped", "running": "no"}
    assert main(["compare", str(stopped), str(running)]) == 0
    assert ("stopped: ended by Ctrl-C or SIGTERM; `sam3-vessel train --resume RUN` continues it"
            in capsys.readouterr().out.splitlines())


def test_bad_input_names_what_is_wrong(runs, tmp_path, capsys):
    with pytest.raises(RunsError, match="not a score of these runs; choose one of dice"):
        compare([str(runs / "*")], sort="hausdorff")
    with pytest.raises(RunsError, match="matches"):
        compare([str(tmp_path / "none-*")])
    (tmp_path / "empty").mkdir()
    assert main(["compare", str(tmp_path / "empty")]) == 1
    assert "config.json cannot be read" in capsys.readouterr().err


def test_the_table_of_three_runs_fits_120_columns(runs, capsys):
    assert main(["compare", str(runs / "*")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert max(map(len, table)) <= 120, table
    assert table[0].split() == ["run", "lr", "width", "done", "best", "dice", "iou", "cldice",
                                "sens", "spec", "acc", "auc"]
    assert table[-1] == ("(sens = sensitivity, spec = specificity, acc = accuracy, "
                         "done = finished, best = best step)")
    assert all(row.split()[0].startswith("…") for row in table[2:5])  # long paths keep names
    assert main(["compare", str(runs / "*"), "--per-view"]) == 0
    both = capsys.readouterr().out
    assert both.startswith("\n".join(table) + "\n\n")  # the overall table, then per view
    views = both.split("\n\n", 1)[1].splitlines()
    assert max(map(len, views)) <= 120, views
    assert views[0].split() == ["run", "view", "dice", "iou", "cldice", "sens", "spec", "acc",
                                "auc"]
    assert [row.split()[1] for row in views[2:8]] == ["LAO", "RAO"] * 3  # per run, each view
    best_run = _rows(compare([str(runs / "*")], csv_out="-"))[0]
    assert views[2].split()[2] == f"{float(best_run['LAO/dice']):.3f}"
    assert main(["compare", str(runs / "*"), "--width", "60"]) == 0
    narrow = capsys.readouterr().out.splitlines()
    assert narrow[0].split()[:2] == ["run", "done"]  # the settings made way
    assert narrow[-1] == ("also differ (wider than 60 columns): lr, width; --csv - shows "
                          "every column")


def test_mirrored_and_unmirrored_scores_are_told_apart(runs, tmp_path, capsys):
    """A finished detail run's report.json is scored with mirror TTA; a run still training
    shows its periodic, unmirrored validation. Side by side, a `tta` column says which."""
    mirrored, running = tmp_path / "mirrored", tmp_path / "running"
    for copy in (mirrored, running):
        shutil.copytree(runs / "lr-1e-3", copy)
    report = json.loads((mirrored / "report.json").read_text())
    report["val"].update(mirror_tta=True, unmirrored={"dice": report["val"]["dice"] - 0.01})
    (mirrored / "report.json").write_text(json.dumps(report))
    (running / "report.json").unlink()
    rows = {r["run"].rsplit("/", 1)[-1]: r for r in _rows(
        compare([str(mirrored), str(running)], csv_out="-"))}
    assert (rows["mirrored"]["tta"], rows["running"]["tta"]) == ("yes", "no")
    assert main(["compare", str(mirrored), str(running)]) == 0
    table = capsys.readouterr().out
    assert "tta" in table.splitlines()[0] and "compare like with like" in table
    assert "tta" not in _rows(compare([str(runs / "*")], csv_out="-"))[0]  # all alike
