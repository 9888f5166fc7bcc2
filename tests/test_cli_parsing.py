"""The command lines answer before anything heavy is imported: --help, argument errors and
mistyped paths come without torch, peft or sam3 (each takes seconds to import), in fresh
interpreters as a user meets them."""

import json
import subprocess
import sys

import pytest
from conftest import make_dataset, subprocess_env

HEAVY = ("torch", "peft", "sam3", "zarr", "matplotlib")
# Runs `pipeline.commands.main(argv)` and prints its exit status and the heavy modules loaded.
PROBE = f"""
import json, sys
from pipeline.commands import main
try:
    code = main(json.loads(sys.argv[1]))
except SystemExit as stop:
    code = stop.code
loaded = sorted(m for m in {HEAVY!r} if m in sys.modules)
print(json.dumps({{"code": code, "loaded": loaded}}))
"""


def _probe(argv: list[str], cwd) -> tuple[int, list[str], str]:
    """(exit status, heavy modules imported, stderr) of `sam3-vessel ARGV` in a new process."""
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argv)], cwd=cwd,
                         env=subprocess_env(), capture_output=True, text=True, timeout=120)
    result = json.loads(out.stdout.splitlines()[-1])
    return result["code"], result["loaded"], out.stderr


@pytest.mark.parametrize("command", ["extract", "train", "predict", "export", "data", "cache",
                                     "runs"])
def test_help_imports_nothing_heavy(command, tmp_path):
    code, loaded, _ = _probe([command, "--help"], tmp_path)
    assert code == 0 and loaded == []


def test_argument_errors_import_neither_torch_nor_peft(tmp_path):
    manifest = make_dataset(tmp_path / "data", 2)
    cases = [
        (["train", "--lerning-rate", "1"], 2, "unrecognized arguments: --lerning-rate"),
        (["train", "--data", str(manifest), "--levels", "3x"], 2, "--levels must include 1x"),
        (["train", "--data", str(manifest), "--steps", "10", "--epochs", "2"], 2,
         "give --steps or --epochs, not both"),
        (["extract", "--data", str(manifest), "--codec", "gzip"], 2, "--codec must be one of"),
        (["predict", "--run", "r", "--data", "m.csv", "--out", "o", "--device", "gpu"], 2,
         "--device must be auto, cuda, cuda:N or cpu"),
        (["trian"], 2, "unknown command 'trian' (did you mean train?)"),
    ]
    for argv, expected, message in cases:
        code, loaded, err = _probe(argv, tmp_path)
        assert code == expected and not {"torch", "peft", "sam3"} & set(loaded), (argv, err)
        assert message in err, (argv, err)


def test_a_mistyped_path_is_named_before_any_model_work(tmp_path):
    manifest = make_dataset(tmp_path, 2)  # tmp_path/manifest.csv
    (tmp_path / "runs" / "lr-1e-3").mkdir(parents=True)
    cases = [  # default --device auto: the path is checked before CUDA is looked for
        (["extract", "--data", "manifst.csv"], "--data manifst.csv: manifest not found (looked "
         f"for in {tmp_path}), did you mean manifest.csv?; --data takes a manifest CSV"),
        (["train", "--data", str(tmp_path / "img")], f"--data {tmp_path / 'img'}: is a folder, "
         "not a manifest"),
        (["train", "--resume", "runs/lr-1e-4"], "--resume runs/lr-1e-4: run directory not "
         f"found (looked for in {tmp_path}), did you mean runs/lr-1e-3?"),
        (["train", "--resume", "runs/lr-1e-3"], "--resume runs/lr-1e-3: not a run directory "
         "(no config.json)"),
        (["predict", "--run", "runs/lr-1e-3", "--data", str(manifest), "--out", "p"],
         "--run runs/lr-1e-3: not a run directory"),
        (["export", "--run", "runs/lr-1e-3", "--out", "x.pt"], "--run runs/lr-1e-3: not a run"),
        (["extract", "--data", str(manifest), "--checkpoint", "sam3.pt"],
         "--checkpoint sam3.pt: checkpoint file not found"),
        (["data", "check", "manifest.cvs"], "did you mean manifest.csv?"),
        (["data", "import", "folder", "imgs", "--out", "m.csv"], "import folder imgs: image "
         "folder not found"),
    ]
    for argv, message in cases:
        code, loaded, err = _probe(argv, tmp_path)
        assert (code, loaded) == (1, []), (argv, err)
        assert err.splitlines() == [f"error: {err.splitlines()[0][7:]}"] and message in err, (
            argv, err)


def test_a_config_on_the_cpu_is_validated_without_torch(tmp_path):
    code = ("import sys\nfrom pipeline.config import TrainConfig, ExtractConfig\n"
            "TrainConfig(backbone='tiny', device='cpu', levels=('1x', '4x'), steps=30)\n"
            "ExtractConfig(backbone='tiny', device='cpu')\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=subprocess_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "['zarr']", out.stderr  # the codec check reads zarr's codecs


def test_the_demo_says_where_it_lives(tmp_path, capsys):
    from pipeline.cli import _demo_note

    _demo_note("demo", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "demo-data"
    assert capsys.readouterr().out == (f"data: the synthetic demo set, {folder}/ (its manifest: "
                                       f"{folder / 'manifest.csv'})\n")
    _demo_note(str(folder / "manifest.csv"), str(tmp_path / "cache"))
    assert capsys.readouterr().out == ""


def test_the_next_command_after_extraction_trains_on_that_cache():
    from pipeline.cli import train_command
    from pipeline.config import ExtractConfig

    auto = ExtractConfig(data="demo", backbone="tiny", device="cpu", augment_copies=4)
    assert train_command(auto, "tiny-0f3a", copies_given=False) == (
        "sam3-vessel train --data demo --cache tiny-0f3a --device cpu")
    chosen = ExtractConfig(data="m.csv", backbone="tiny", device="cpu", cache_dir="c",
                           augment_copies=2, augment="flips")
    assert train_command(chosen, "tiny-0f3a", copies_given=True) == (
        "sam3-vessel train --data m.csv --cache tiny-0f3a --cache-dir c --augment-copies 2 "
        "--augment flips --device cpu")
