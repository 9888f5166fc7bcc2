"""The files of a run directory: what keeps it to one run (refusing to mix runs), and what
`--resume` may change. (`pipeline.train.run_data` is another concern: the run's datasets and
loaders.)

A new run records the manifest's rows (`manifest.json`: each image's key, split and view, and
their sha256); a resume compares the manifest as it is now against that record and refuses one
whose rows, splits or views changed, naming them. A directory that already holds a run is
refused unless `--resume` continues it or `--overwrite` replaces it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from pipeline.errors import UserError, check_path

RUN_FILES = ("config.json", "manifest.json", "metrics.jsonl", "last.pt", "best.pt",
             "report.json", "curves.png", "caches.json", "adapter", "adapters", "overlays",
             "tensorboard")
"""Everything train_head.py writes into a run directory (`--overwrite` removes only these)."""
SHOWN = 3


class RunDirError(UserError, RuntimeError):
    """A run directory that cannot be used as asked; the message says what to do."""


def check_run(run_dir: str | Path, *, flag: str, files: tuple[str, ...] = ("best.pt",)) -> Path:
    """`run_dir` when it is a run directory holding `files`; else `RunDirError` (or
    `MissingPathError` for a folder that does not exist) naming `flag` and what to do. Reads
    nothing but the folder's listing: commands call it before any model work."""
    run_dir = check_path(run_dir, flag=flag, kind="folder", what="run directory")
    if not (run_dir / "config.json").is_file():
        raise RunDirError(f"{flag} {run_dir}: not a run directory (no config.json); a run "
                          "directory is what `sam3-vessel train` writes (its --run-dir)")
    missing = [name for name in files if not (run_dir / name).exists()]
    if missing:
        raise RunDirError(f"{flag} {run_dir}: the run has no {', '.join(missing)} yet: it "
                          "writes best.pt and adapter/ at its first validation, and "
                          "report.json when it finishes")
    return run_dir


def claim_run_dir(run_dir: Path, *, overwrite: bool) -> None:
    """Make `run_dir` ready for a new run: refuse one that holds a run unless `overwrite`, which
    removes the files of the old run (and only those)."""
    held = [name for name in RUN_FILES if (run_dir / name).exists()]
    if held and not overwrite:
        raise RunDirError(
            f"{run_dir} already holds a run ({', '.join(held[:4])}"
            f"{', ...' if len(held) > 4 else ''}); continue it with --resume {run_dir}, "
            "replace it with --overwrite, or choose another --run-dir")
    for name in held:
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)


def manifest_record(samples, keys: list[str]) -> dict:
    """{"rows": [[image, key, split, view], ...], "sha256": of the rows}: what a resume compares."""
    rows = [[str(s.image), k, s.split or "train", s.view or ""]
            for s, k in zip(samples, keys, strict=True)]
    digest = hashlib.sha256(json.dumps(rows).encode()).hexdigest()
    return {"rows": rows, "sha256": digest}


def recorded_splits(run_dir: Path) -> dict[str, str] | None:
    """{image key: split} of the run's recorded manifest; None for a run without one."""
    path = Path(run_dir) / "manifest.json"
    if not path.is_file():
        return None
    return {key: split for _, key, split, _ in json.loads(path.read_text())["rows"]}


def check_resumable_manifest(run_dir: Path, manifest: Path, record: dict) -> None:
    """Raise `RunDirError` naming what changed between the run's recorded manifest and
    `record` (the manifest as it is now); runs made before manifests were recorded pass."""
    saved_path = run_dir / "manifest.json"
    if not saved_path.is_file():
        return
    saved = json.loads(saved_path.read_text())
    if saved["sha256"] == record["sha256"]:
        return
    before = {key: (image, split, view) for image, key, split, view in saved["rows"]}
    now = {key: (image, split, view) for image, key, split, view in record["rows"]}
    changes = []

    def note(what: str, found: list[str]) -> None:
        if found:
            more = f", and {len(found) - SHOWN} more" if len(found) > SHOWN else ""
            changes.append(f"{len(found)} {what} ({'; '.join(found[:SHOWN])}{more})")

    note("images added", [now[k][0] for k in now if k not in before])
    note("images removed", [before[k][0] for k in before if k not in now])
    common = [k for k in now if k in before]
    note("splits changed", [f"{now[k][0]}: {before[k][1]} -> {now[k][1]}" for k in common
                            if before[k][1] != now[k][1]])
    note("views changed", [f"{now[k][0]}: {before[k][2]!r} -> {now[k][2]!r}" for k in common
                           if before[k][2] != now[k][2]])
    if not changes:  # same samples, other order or other paths to the same bytes
        return
    raise RunDirError(
        f"--resume {run_dir}: the manifest {manifest} changed since the run started: "
        f"{', '.join(changes)}. Resume with the manifest the run was started with, or start a "
        "new run")


def resume_changes(run_dir: Path, saved: dict, requested: dict, allowed: frozenset) -> dict:
    """The requested values that differ from the run's `saved` config; `RunDirError` naming
    every differing field not in `allowed`."""
    def same(name, value):
        old = saved.get(name)
        if name in ("data", "cache_dir") and old is not None and value is not None:
            return Path(value).resolve() == Path(old).resolve() or (
                name == "data" and value == "demo" and Path(old).parent.name == "demo-data")
        if isinstance(old, list | tuple) and isinstance(value, list | tuple):
            return list(old) == list(value)
        return old == value

    changed = {k: v for k, v in requested.items()
               if k not in ("resume", "run_dir") and not same(k, v)}
    refused = sorted(set(changed) - allowed)
    if refused:
        listed = ", ".join(f"--{k.replace('_', '-')} {changed[k]} (the run has {saved.get(k)})"
                           for k in refused)
        may = ", ".join(f"--{k.replace('_', '-')}" for k in sorted(allowed))
        raise RunDirError(f"--resume {run_dir}: {listed}: a resumed run keeps its own settings; "
                          f"only {may} may change. Start a new run to change the others")
    return {k: (str(Path(v).resolve()) if k == "cache_dir" else v) for k, v in changed.items()
            if k != "data"}
