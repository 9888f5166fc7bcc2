"""Seconds until a command answers `--help`, a mistyped flag or a mistyped path, before and after.

    python bench/bench_help.py                          # this checkout against --before
    python bench/bench_help.py --before ac0d48e --repeat 7

Every case is a fresh `python` process, as a user starts one, timed from spawn to exit (the
best and the median of `--repeat` runs, after one unmeasured run that warms the file cache).
"After" runs this checkout (`python -m pipeline.commands ...`, the same code as the installed
`sam3-vessel`, and the two scripts); "before" runs the commands of revision `--before`, exported
with `git archive` into a temporary folder. `import torch` alone is the yardstick: a command
that imports it cannot answer faster.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, Others, load_average, machine_lines, publish, share, table  # noqa: E402

# (case, command after, command before); {py} is the interpreter, {m} a manifest that exists.
CASES = [
    ("import torch (yardstick)", "{py} -c 'import torch'", "{py} -c 'import torch'"),
    ("sam3-vessel --help", "{py} -m pipeline.commands --help", None),
    ("extract --help", "{py} -m pipeline.commands extract --help",
     "{py} extract_features.py --help"),
    ("train --help", "{py} -m pipeline.commands train --help", "{py} train_head.py --help"),
    ("train_head.py --help (the script)", "{py} train_head.py --help",
     "{py} train_head.py --help"),
    ("predict --help", "{py} -m pipeline.commands predict --help",
     "{py} -m pipeline.predict --help"),
    ("export --help", "{py} -m pipeline.commands export --help",
     "{py} -m pipeline.export --help"),
    ("data --help", "{py} -m pipeline.commands data --help", "{py} -m pipeline.data --help"),
    ("cache --help", "{py} -m pipeline.commands cache --help", "{py} -m pipeline.cache --help"),
    ("runs --help", "{py} -m pipeline.commands runs --help", "{py} -m pipeline.runs --help"),
    ("train, a mistyped flag", "{py} -m pipeline.commands train --lerning-rate 1",
     "{py} train_head.py --lerning-rate 1"),
    ("train, a contradiction (--steps and --epochs)",
     "{py} -m pipeline.commands train --data {m} --steps 9 --epochs 2",
     "{py} train_head.py --data {m} --steps 9 --epochs 2"),
    ("extract, a mistyped manifest path",
     "{py} -m pipeline.commands extract --data {m}x --backbone tiny",
     "{py} extract_features.py --data {m}x --backbone tiny"),
]


def time_command(command: str, cwd: Path, env: dict, repeat: int) -> tuple[float, float, int]:
    """(best s, median s, exit status) of `command` run `repeat` times after one warm-up."""
    times, code = [], 0
    for i in range(repeat + 1):
        start = time.perf_counter()
        code = subprocess.run(command, shell=True, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL).returncode
        if i:
            times.append(time.perf_counter() - start)
    return min(times), statistics.median(times), code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="ac0d48e",
                        help="the revision to compare with (default: ac0d48e, before issue 21)")
    parser.add_argument("--repeat", type=int, default=5, help="measured runs per case (5)")
    parser.add_argument("--no-append", action="store_true", help="print only")
    args = parser.parse_args()
    start_load = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "before"
        before.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", args.before],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(before)], input=archive, check=True)
        manifest = Path(tmp) / "manifest.csv"
        manifest.write_text("image,mask,view,split\n")
        rows = []
        with Others() as others:
            for case, after_cmd, before_cmd in CASES:
                cells = []
                for root, command in ((REPO, after_cmd), (before, before_cmd)):
                    if command is None:
                        cells += ["-", "-"]
                        continue
                    env = dict(os.environ, PYTHONPATH=str(root), HF_HUB_OFFLINE="1")
                    best, median, code = time_command(
                        command.format(py=sys.executable, m=manifest), root, env, args.repeat)
                    cells += [f"{best:.2f} / {median:.2f}", code]
                rows.append([case, *cells])
                print(rows[-1], flush=True)
    header = ["case", "after: best / median s", "exit", f"before ({args.before})", "exit"]
    notes = [f"{args.repeat} measured runs per case after one warm-up, each a fresh process; "
             f"other jobs used {share(others.share)} of the CPUs meanwhile",
             "after: `python -m pipeline.commands X` is what the installed `sam3-vessel X` runs; "
             "before: the scripts and `python -m pipeline.X` of that revision",
             "the mistyped path is reported before torch is imported now; before, it came "
             "after the config dump and the imports of every stage module"]
    text = "\n".join([
        "## bench_help: --help, argument errors and paths, before and after (issue 21)", "",
        *machine_lines("cpu"),
        f"- load average (1/5/15 min) at start: {start_load}; at end: {load_average()}",
        f"- command: `python bench/bench_help.py --before {args.before} "
        f"--repeat {args.repeat}`", "",
        table("Seconds from spawn to exit", header, rows), "Notes:", "",
        *[f"- {n}" for n in notes], ""])
    publish(text, append=not args.no_append)


if __name__ == "__main__":
    main()
