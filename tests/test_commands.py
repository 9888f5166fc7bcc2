"""`sam3-vessel`: the installed command, its sub-commands, and running it from another folder."""

import inspect
import re
import shutil
import subprocess
import sys
from importlib import import_module

import pytest
from conftest import REPO, subprocess_env

from pipeline.commands import COMMANDS, PROG, main


def test_the_package_installs_the_command():
    text = (REPO / "pyproject.toml").read_text()  # tomllib is Python 3.11+; we support 3.10
    section = re.search(r"^\[project\.scripts\]\n(.*?)(?=^\[)", text, re.M | re.S).group(1)
    entries = re.findall(r'^([\w-]+) = "([\w.:]+)"', section, re.M)
    assert entries == [(PROG, "pipeline.commands:main")]


def test_every_sub_command_names_a_main_taking_argv_and_prog():
    assert list(COMMANDS) == ["data", "extract", "train", "predict", "runs", "export", "cache"]
    for module, function, _ in COMMANDS.values():
        parameters = inspect.signature(getattr(import_module(module), function)).parameters
        assert list(parameters)[:2] == ["argv", "prog"], (module, function)


def test_help_lists_the_commands_and_each_names_itself(capsys):
    assert main(["--help"]) == 0
    listing = capsys.readouterr().out
    assert all(f"\n  {name} " in listing for name in COMMANDS)
    with pytest.raises(SystemExit) as stop:
        main(["runs", "compare", "--help"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith("usage: sam3-vessel runs compare")
    assert main([]) == 2 and "usage: sam3-vessel COMMAND" in capsys.readouterr().err
    assert main(["--version"]) == 0
    assert re.fullmatch(r"sam3-vessel \d+\.\d+\.\d+\n", capsys.readouterr().out)


def _installed() -> str | None:
    """The `sam3-vessel` on PATH when it runs this checkout's package, else None."""
    found = shutil.which(PROG)
    if found is None:
        return None
    python = open(found).readline().removeprefix("#!").strip()  # the script's interpreter
    where = subprocess.run([python, "-c", "import pipeline; print(pipeline.__file__)"],
                           capture_output=True, text=True, cwd="/")
    return found if where.stdout.strip() == str(REPO / "pipeline" / "__init__.py") else None


def test_the_commands_run_from_another_folder(tmp_path):
    """From a folder that is not the repository, the demo set is made and checked under it."""
    installed = _installed()
    command = [installed] if installed else [sys.executable, "-m", "pipeline.commands"]
    out = subprocess.run([*command, "data", "check", "demo", "--cache-dir", "here"],
                         cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("demo: manifest check: 96 rows, 0 errors")
    assert out.stdout.rstrip().endswith("next: extract its features: sam3-vessel extract --data "
                                        "demo (--backbone tiny for a demo without SAM 3's weights)")
    assert (tmp_path / "here" / "demo-data" / "manifest.csv").is_file()
