"""Compare training runs: the settings that differ, the best step and every score.

    python -m pipeline.runs compare runs/*                       # terminal table, best first
    python -m pipeline.runs compare runs/lr-* --sort LAO/dice --markdown
    python -m pipeline.runs compare runs/* --csv runs.csv --plot curves.png

Each run directory is read as `train_head.py` leaves it: settings from `config.json`, the best
validation (its scores overall and per view) from `report.json`, validation curves from
`metrics.jsonl`. A run still training has no report.json yet: its best is the metrics.jsonl
validation with the highest Dice, the trainer's own choice, and `finished` says no.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import UserError, run_command
from pipeline.train.reporting import MetricsLog

# Settings that name the run rather than describe it.
NOT_SETTINGS = ("run_dir", "resume")
# Numbers of a validation record that are not scores (the loss is not in report.json).
NOT_SCORES = ("n", "epoch", "step", "seconds", "lr", "e2e", "loss")
VIEW_SEPARATOR = "/"


class RunsError(UserError, ValueError):
    """A run directory cannot be read; the message names it and the file."""


@dataclass
class Run:
    """One run directory, read."""

    path: Path
    settings: dict
    """config.json's resolved config (lists as tuples), plus the cache id as `cache`."""
    best_at: int | None
    """The best validation's `step` (when the run counts steps) or `epoch`."""
    scores: dict[str, float | None]
    """Every score of the best validation: `dice`, ..., and per view `LAO/dice`, ..."""
    curves: list[dict]
    """metrics.jsonl's validation records, in file order."""
    finished: bool


def expand(patterns: list[str]) -> list[Path]:
    """Run directories named by `patterns`, each once, in the order given. A glob keeps the
    directories holding a config.json (runs/* may hold other files); a path must be a run."""
    paths: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = [Path(m) for m in sorted(glob.glob(pattern))
                       if (Path(m) / "config.json").is_file()]
            if not matches:
                raise RunsError(f"no run directory (with a config.json) matches {pattern!r}")
        elif not Path(pattern).is_dir():
            raise RunsError(f"{pattern} is not a directory; pass train_head.py run directories")
        else:
            matches = [Path(pattern)]
        paths += [m for m in matches if m not in paths]
    return paths


def best_scores(val: dict) -> dict[str, float | None]:
    """{name: value} of a validation record or report: overall scores, then `VIEW/score`."""
    overall = {k: _number(v) for k, v in val.items()
               if k not in NOT_SCORES and (_number(v) is not None or v is None)}
    per_view = {f"{view}{VIEW_SEPARATOR}{k}": _number(v)
                for view, scores in sorted((val.get("per_view") or {}).items())
                for k, v in scores.items() if k not in NOT_SCORES}
    return overall | per_view


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _step(record: dict) -> int | None:
    value = record.get("step", record.get("epoch"))
    return int(value) if isinstance(value, (int, float)) else None


def load_run(path: Path) -> Run:
    """Read one run directory; a missing or unreadable config.json is a `RunsError`."""
    config_file = path / "config.json"
    try:
        saved = json.loads(config_file.read_text())
        settings = dict(saved["config"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise RunsError(f"{config_file} cannot be read ({type(err).__name__}): is {path} a "
                        "train_head.py run directory?") from err
    settings = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()
                if k not in NOT_SETTINGS}
    settings["cache"] = (saved.get("cache") or {}).get("id")
    curves = [r for r in MetricsLog(path / "metrics.jsonl").read() if r.get("split") == "val"]
    report = path / "report.json"
    saved = json.loads(report.read_text()) if report.is_file() else {}
    if saved:
        best = saved["val"]
    else:
        scored = [r for r in curves if _number(r.get("dice")) is not None]
        best = max(scored, key=lambda r: r["dice"]) if scored else {}
    finished = bool(saved) and "interrupted" not in saved  # Ctrl-C / SIGTERM write one too
    return Run(path, settings, _step(best), best_scores(best), curves, finished)


def differing_settings(runs: list[Run]) -> list[str]:
    """Names of the settings whose values are not the same in every run, in config order."""
    names = list(dict.fromkeys(k for run in runs for k in run.settings))
    return [k for k in names if len({repr(run.settings.get(k)) for run in runs}) > 1]


def score_names(runs: list[Run]) -> list[str]:
    """Every score any run has: overall ones first, then per view, in first-seen order."""
    names = list(dict.fromkeys(k for run in runs for k in run.scores))
    return ([k for k in names if VIEW_SEPARATOR not in k]
            + [k for k in names if VIEW_SEPARATOR in k])


def comparison(runs: list[Run], sort: str = "dice") -> tuple[list[str], list[list]]:
    """(header, rows): one row per run, best `sort` score first (runs without it last).

    Columns: run, the differing settings, finished, best (step or epoch), every score.
    """
    scores = score_names(runs)
    if runs and sort not in scores:
        raise RunsError(f"--sort {sort!r} is not a score of these runs; choose one of "
                        f"{', '.join(scores)}")
    settings = differing_settings(runs)
    best_name = "best step" if any("step" in r for run in runs for r in run.curves) else \
        "best epoch"
    header = ["run", *settings, "finished", best_name, *scores]
    ordered = sorted(runs, key=lambda run: (run.scores.get(sort) is None,
                                            -(run.scores.get(sort) or 0.0)))
    rows = [[str(run.path), *(run.settings.get(k) for k in settings),
             "yes" if run.finished else "no", run.best_at,
             *(run.scores.get(k) for k in scores)] for run in ordered]
    return header, rows


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.4g}"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def terminal_table(header: list[str], rows: list[list]) -> str:
    """Columns aligned with spaces; numbers right-aligned."""
    cells = [header] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    numeric = [all(isinstance(row[i], (int, float)) or row[i] is None for row in rows)
               for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if n else c.ljust(w)
                       for c, w, n in zip(row, widths, numeric, strict=True)).rstrip()
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(header: list[str], rows: list[list]) -> str:
    escape = [[_cell(v).replace("|", r"\|") for v in row] for row in [header, *rows]]
    lines = ["| " + " | ".join(row) + " |" for row in escape]
    lines.insert(1, "|" + "|".join("---" for _ in header) + "|")
    return "\n".join(lines)


def csv_text(header: list[str], rows: list[list]) -> str:
    """CSV with empty cells for missing values and full-precision numbers."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if v is None else ",".join(map(str, v)) if isinstance(v, tuple)
                       else v for v in row] for row in rows])
    return out.getvalue()


def plot_curves(runs: list[Run], out_png: Path, scores: list[str] | None = None) -> list[str]:
    """One panel per overall score (default: every overall score of the runs), one line per run:
    validation value against step (or epoch). Returns the scores drawn."""
    import matplotlib.pyplot as plt  # pipeline.train.reporting has chosen the Agg backend
    from matplotlib.ticker import MaxNLocator

    scores = scores or [k for k in score_names(runs) if VIEW_SEPARATOR not in k]
    fig, axes = plt.subplots(1, len(scores), figsize=(5 * len(scores), 4), squeeze=False)
    uses_steps = any("step" in r for run in runs for r in run.curves)
    for ax, score in zip(axes.flat, scores, strict=True):
        for i, run in enumerate(runs):
            points = sorted((_step(r), _number(r.get(score))) for r in run.curves
                            if _step(r) is not None and _number(r.get(score)) is not None)
            if points:
                ax.plot(*zip(*points, strict=True), "-o", ms=3, color=f"C{i % 10}",
                        label=run.path.name)
        ax.set_title(f"validation {score}")
        ax.set_xlabel("step" if uses_steps else "epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return scores


def compare(patterns: list[str], *, sort: str = "dice", markdown: bool = False,
            csv_out: str | None = None, plot: Path | None = None) -> str:
    """What `compare` prints; writes the CSV and the plot when asked."""
    paths = expand(patterns)
    runs = [load_run(p) for p in paths]
    header, rows = comparison(runs, sort)
    if csv_out == "-":
        return csv_text(header, rows)
    if csv_out:
        Path(csv_out).write_text(csv_text(header, rows))
    if plot:
        plot_curves(runs, plot)
    return markdown_table(header, rows) if markdown else terminal_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.runs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    sub = commands.add_parser("compare", help="a table of runs: differing settings and scores")
    sub.add_argument("runs", nargs="+", help="run directories or globs (runs/lr-*)")
    sub.add_argument("--sort", default="dice",
                     help="score to sort by, best first: dice, cldice, LAO/dice, ...")
    sub.add_argument("--markdown", action="store_true", help="print a Markdown table")
    sub.add_argument("--csv", metavar="OUT", help="also write the table as CSV (- : print it)")
    sub.add_argument("--plot", metavar="OUT.png", type=Path,
                     help="overlay the runs' validation curves, one panel per score")
    args = parser.parse_args(argv)
    return run_command(lambda: _compare(args), resume="run the same command again (it only "
                       "reads the runs)")


def _compare(args) -> int:
    text = compare(args.runs, sort=args.sort, markdown=args.markdown, csv_out=args.csv,
                   plot=args.plot)
    print(text, end="" if text.endswith("\n") else "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
