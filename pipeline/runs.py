"""Compare training runs: the settings that differ, the best step and every score.

    sam3-vessel runs compare 'runs/*'                          # terminal table, best first
    sam3-vessel runs compare 'runs/lr-*' --sort LAO/dice --per-view --markdown
    sam3-vessel runs compare 'runs/*' --csv runs.csv --plot curves.png

The table shows the overall scores (`--per-view` adds each view's) and fits `--width` columns
(120 by default): long values are cut, settings that do not fit are named under it. The CSV
holds every column in full. `python -m pipeline.runs` is the same command.

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

# Settings that name the run rather than describe it.
NOT_SETTINGS = ("run_dir", "resume")
# Numbers of a validation record that are not scores (the loss is not in report.json).
NOT_SCORES = ("n", "epoch", "step", "seconds", "lr", "e2e", "loss")
VIEW_SEPARATOR = "/"
WIDTH = 120
"""Columns the terminal table fits by default (`--width`)."""
CELL = 28
"""Longest text cell of the terminal table; a path keeps its end, other text its start."""
SHORT = {"sensitivity": "sens", "specificity": "spec", "accuracy": "acc", "finished": "done",
         "best step": "best", "best epoch": "best ep"}
"""Terminal column names, shorter than the CSV's and Markdown's (named under the table)."""


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
    mirrored: bool = False
    """The scores are with mirror TTA (a finished run's report.json); periodic validations,
    which a run still training shows, are not."""
    stopped: bool = False
    """Ended by Ctrl-C or SIGTERM (its report.json says so): `--resume` continues it."""


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
    from pipeline.train.reporting import MetricsLog  # matplotlib: not for --help

    curves = [r for r in MetricsLog(path / "metrics.jsonl").read() if r.get("split") == "val"]
    report = path / "report.json"
    saved = json.loads(report.read_text()) if report.is_file() else {}
    if saved:
        best = saved["val"]
    else:
        scored = [r for r in curves if _number(r.get("dice")) is not None]
        best = max(scored, key=lambda r: r["dice"]) if scored else {}
    finished = bool(saved) and "interrupted" not in saved  # Ctrl-C / SIGTERM write one too
    return Run(path, settings, _step(best), best_scores(best), curves, finished,
               best.get("mirror_tta") is True, stopped="interrupted" in saved)


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

    Columns: run, the differing settings, finished, `tta` where some runs' scores are with
    mirror TTA and others' not, best (step or epoch), every score (overall, then per view).
    """
    scores = score_names(runs)
    if runs and sort not in scores:
        raise RunsError(f"--sort {sort!r} is not a score of these runs; choose one of "
                        f"{', '.join(scores)}")
    settings = differing_settings(runs)
    best_name = "best step" if any("step" in r for run in runs for r in run.curves) else \
        "best epoch"
    tta = ["tta"] if len({run.mirrored for run in runs}) > 1 else []
    header = ["run", *settings, "finished", *tta, best_name, *scores]
    ordered = sorted(runs, key=lambda run: (run.scores.get(sort) is None,
                                            -(run.scores.get(sort) or 0.0)))
    rows = [[str(run.path), *(run.settings.get(k) for k in settings),
             "yes" if run.finished else "stopped" if run.stopped else "no",
             *(["yes" if run.mirrored else "no"] if tta else []),
             run.best_at,
             *(run.scores.get(k) for k in scores)] for run in ordered]
    return header, rows


def overall_only(header: list[str], rows: list[list], keep: str = "") -> tuple[list, list]:
    """The columns of `comparison` without per-view scores (except `keep`, the sort key)."""
    chosen = [i for i, name in enumerate(header) if VIEW_SEPARATOR not in name or name == keep]
    return [header[i] for i in chosen], [[row[i] for i in chosen] for row in rows]


def by_view(header: list[str], rows: list[list]) -> tuple[list, list]:
    """The per-view columns of `comparison` in long form: (["run", "view", score, ...], one row
    per run and view, in the runs' order), so that any number of views fits a terminal."""
    views = list(dict.fromkeys(h.split(VIEW_SEPARATOR)[0] for h in header
                               if VIEW_SEPARATOR in h))
    scores = list(dict.fromkeys(h.split(VIEW_SEPARATOR, 1)[1] for h in header
                                if VIEW_SEPARATOR in h))
    column = {name: i for i, name in enumerate(header)}
    long = []
    for row in rows:
        for view in views:
            values = [row[column[f"{view}{VIEW_SEPARATOR}{k}"]]
                      if f"{view}{VIEW_SEPARATOR}{k}" in column else None for k in scores]
            if any(v is not None for v in values):
                long.append([row[0], view, *values])
    return ["run", "view", *scores], long


def _cell(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:.4g}"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _cut(text: str, limit: int = CELL) -> str:
    """`text` at most `limit` characters: a path keeps its end (the run's or file's name)."""
    if len(text) <= limit:
        return text
    return "…" + text[-(limit - 1):] if "/" in text else text[: limit - 1] + "…"


def terminal_table(header: list[str], rows: list[list], *, width: int | None = WIDTH,
                   droppable: list[str] = ()) -> str:
    """Columns aligned with spaces, numbers right-aligned with 3 decimals, short names
    (`SHORT`). Wider than `width` columns, the `droppable` ones (settings) are left out from
    the last, and named under the table."""
    cells = [[SHORT.get(h, h) for h in header]] + [
        [_cut(_cell(v, 3)) for v in row] for row in rows]
    numeric = [all(isinstance(row[i], (int, float)) or row[i] is None for row in rows)
               for i in range(len(header))]
    shown, left_out = list(range(len(header))), []

    def line_width() -> int:
        return sum(max(len(c[i]) for c in cells) for i in shown) + 2 * (len(shown) - 1)

    for name in reversed(droppable):
        if width is None or line_width() <= width:
            break
        shown.remove(header.index(name))
        left_out.insert(0, name)
    widths = {i: max(len(c[i]) for c in cells) for i in shown}
    lines = ["  ".join(c[i].rjust(widths[i]) if numeric[i] else c[i].ljust(widths[i])
                       for i in shown).rstrip() for c in cells]
    lines.insert(1, "  ".join("-" * widths[i] for i in shown))
    notes = [f"{short} = {long}" for long, short in SHORT.items() if long in header]
    if notes:
        lines.append("(" + ", ".join(notes) + ")")
    if "tta" in header:
        lines.append("tta: scored with mirror TTA (a finished run's report.json) or not (the "
                     "periodic validations of a run not finished): compare like with like")
    if "finished" in header and any(c[header.index("finished")] == "stopped"
                                    for c in cells[1:]):
        lines.append("stopped: ended by Ctrl-C or SIGTERM; `sam3-vessel train --resume RUN` "
                     "continues it")
    if left_out:
        lines.append(f"also differ (wider than {width} columns): {', '.join(left_out)}; "
                     "--csv - shows every column")
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
    """A grid of panels, one per overall score (default: every overall score of the runs), at
    most three a row, one line per run (validation value against step or epoch), each panel's
    y axis fitted to its values, one legend of the runs under the grid. Returns the scores
    drawn."""
    import matplotlib.pyplot as plt  # pipeline.train.reporting has chosen the Agg backend
    from matplotlib.ticker import MaxNLocator

    scores = scores or [k for k in score_names(runs) if VIEW_SEPARATOR not in k]
    cols = min(3, len(scores))
    rows = -(-len(scores) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 2.9 * rows + 0.5), squeeze=False,
                             layout="constrained")
    uses_steps = any("step" in r for run in runs for r in run.curves)
    for ax, score in zip(axes.flat, scores, strict=False):
        for i, run in enumerate(runs):
            points = sorted((_step(r), _number(r.get(score))) for r in run.curves
                            if _step(r) is not None and _number(r.get(score)) is not None)
            if points:
                ax.plot(*zip(*points, strict=True), "-o", ms=3, color=f"C{i % 10}",
                        label=run.path.name)
        ax.set_title(f"validation {score}", fontsize=10)
        ax.set_xlabel("step" if uses_steps else "epoch", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(scores):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(handles)),
                   fontsize=9)
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return scores


def compare(patterns: list[str], *, sort: str = "dice", markdown: bool = False,
            csv_out: str | None = None, plot: Path | None = None, per_view: bool = False,
            width: int | None = WIDTH) -> str:
    """What `compare` prints; writes the CSV (every column) and the plot when asked."""
    paths = expand(patterns)
    runs = [load_run(p) for p in paths]
    header, rows = comparison(runs, sort)
    if csv_out == "-":
        return csv_text(header, rows)
    if csv_out:
        Path(csv_out).write_text(csv_text(header, rows))
    if plot:
        plot_curves(runs, plot)
    views = by_view(header, rows) if per_view else None
    header, rows = overall_only(header, rows, keep=sort)
    if markdown:
        tables = [markdown_table(header, rows), *([markdown_table(*views)] if views else [])]
    else:
        tables = [terminal_table(header, rows, width=width,
                                 droppable=differing_settings(runs)),
                  *([terminal_table(*views, width=width)] if views else [])]
    return "\n\n".join(t.rstrip("\n") for t in tables)


def main(argv: list[str] | None = None, prog: str = "python -m pipeline.runs") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    sub = commands.add_parser("compare", help="a table of runs: differing settings and scores")
    sub.add_argument("runs", nargs="+", help="run directories or globs (runs/lr-*)")
    sub.add_argument("--sort", default="dice",
                     help="score to sort by, best first: dice, cldice, LAO/dice, ...")
    sub.add_argument("--per-view", action="store_true",
                     help="also each view's scores, a second table with one row per run and "
                     "view; the CSV always has them (LAO/dice, ...)")
    sub.add_argument("--width", type=int, default=WIDTH,
                     help=f"columns the terminal table fits (default: {WIDTH}); settings that "
                     "do not fit are named under it")
    sub.add_argument("--markdown", action="store_true", help="print a Markdown table")
    sub.add_argument("--csv", metavar="OUT", help="also write the table as CSV (- : print it)")
    sub.add_argument("--plot", metavar="OUT.png", type=Path,
                     help="the runs' validation curves: a grid of panels, one per score")
    args = parser.parse_args(argv)
    return run_command(lambda: _compare(args), resume="run the same command again (it only "
                       "reads the runs)")


def _compare(args) -> int:
    text = compare(args.runs, sort=args.sort, markdown=args.markdown, csv_out=args.csv,
                   plot=args.plot, per_view=args.per_view, width=args.width)
    print(text, end="" if text.endswith("\n") else "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
