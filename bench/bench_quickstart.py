"""Time the README's quick start (or its longer recipe) as written, and read the Dice it reaches.

    python bench/bench_quickstart.py                      # the quick start
    python bench/bench_quickstart.py --recipe longer      # the longer, better recipe
    python bench/bench_quickstart.py --no-append          # print only

The commands are read from the README: the `sam3-vessel` lines of the bash block after the
`<!-- bench: quickstart -->` (or `<!-- bench: longer -->`) marker, so the figures the README
states and the commands it shows cannot drift apart. Each runs as written in a fresh folder under
`--work-dir` (its `cache/` and `runs/` start empty), through the installed `sam3-vessel` when it
runs this checkout, else `python -m pipeline.commands` (the same code). Reported: each command's
wall time, the total, the run's best val Dice at native size (report.json) and its step, the
disk of the cache, and the load on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, Others, load_average, machine_lines, publish, share, table  # noqa: E402


def readme_commands(recipe: str) -> list[str]:
    """The `sam3-vessel` command lines of the README's bash block marked `bench: RECIPE`
    (continuation lines joined, comments dropped)."""
    text = (REPO / "README.md").read_text()
    match = re.search(rf"<!-- bench: {recipe} -->\s*```bash\n(.*?)```", text, re.S)
    if match is None:
        raise SystemExit(f"README.md has no block marked <!-- bench: {recipe} -->")
    joined = match.group(1).replace("\\\n", " ")
    lines = [line.split("  #", 1)[0].strip() for line in joined.splitlines()]
    return [line for line in lines if line.startswith("sam3-vessel ")]


def command_prefix() -> list[str]:
    """The installed `sam3-vessel` when it runs this checkout, else `python -m
    pipeline.commands` with this checkout on PYTHONPATH."""
    found = shutil.which("sam3-vessel")
    if found:
        python = open(found).readline().removeprefix("#!").strip()
        where = subprocess.run([python, "-c", "import pipeline; print(pipeline.__file__)"],
                               capture_output=True, text=True, cwd="/").stdout.strip()
        if where == str(REPO / "pipeline" / "__init__.py"):
            return [found]
    return [sys.executable, "-m", "pipeline.commands"]


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="quickstart", choices=("quickstart", "longer"))
    parser.add_argument("--work-dir", default=str(REPO / "cache" / "bench" / "quickstart"),
                        help="a fresh folder per recipe is made under it")
    parser.add_argument("--no-append", action="store_true", help="print only")
    args = parser.parse_args()
    commands = readme_commands(args.recipe)
    work = Path(args.work_dir) / args.recipe
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    prefix = command_prefix()
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    start_load, rows, total = load_average(), [], 0.0
    with Others() as others:
        for line in commands:
            argv = prefix + shlex.split(line)[1:]
            print(f"$ {line}", flush=True)
            start = time.perf_counter()
            with (work / "log.txt").open("a") as log:
                done = subprocess.run(argv, cwd=work, env=env, stdout=log,
                                      stderr=subprocess.STDOUT)
            seconds = time.perf_counter() - start
            if done.returncode:
                raise SystemExit(f"`{line}` exited {done.returncode}; see {work / 'log.txt'}")
            total += seconds
            rows.append([f"`{line}`", f"{seconds:.1f}"])
            print(f"  {seconds:.1f} s", flush=True)
    rows.append(["total", f"{total:.1f}"])
    runs = sorted((work / "runs").glob("*/report.json"))
    report = json.loads(runs[-1].read_text())["val"] if runs else {}
    cache = folder_bytes(work / "cache") - folder_bytes(work / "cache" / "demo-data")
    result = [["best val Dice (native size, 24 val images)", f"{report.get('dice', 0):.3f}"],
              ["its step", report.get("step", "-")],
              ["val clDice / AUC", f"{report.get('cldice', 0):.3f} / {report.get('auc', 0):.3f}"],
              ["feature cache on disk", f"{cache / 2**20:.1f} MB"]]
    notes = [f"other jobs used {share(others.share)} of the CPUs meanwhile (load average at "
             f"start {start_load}, at end {load_average()}): on a quiet machine expect less",
             f"commands run through `{' '.join(Path(p).name for p in prefix)}` in a fresh "
             f"folder ({work})"]
    text = "\n".join([
        f"## bench_quickstart: the README's {args.recipe} recipe, tiny, cpu", "",
        *machine_lines("cpu"),
        f"- load average (1/5/15 min) at start: {start_load}; at end: {load_average()}",
        f"- command: `python bench/bench_quickstart.py --recipe {args.recipe}`", "",
        table("Wall time of each command, as the README writes it", ["command", "s"], rows),
        table("What it reaches", ["figure", "value"], result),
        "Notes:", "", *[f"- {n}" for n in notes], ""])
    publish(text, append=not args.no_append)


if __name__ == "__main__":
    main()
