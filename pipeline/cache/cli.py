"""`sam3-vessel cache list|info|verify|rm` (or `python -m pipeline.cache`): look after the
feature caches. zarr is imported once the flags are parsed."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from pipeline.errors import run_command


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


def main(argv: list[str] | None = None, prog: str = "python -m pipeline.cache") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("--cache-dir", default="cache", help="where the caches live")
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="every cache with its size, N and signature "
                                  "summary")
    listing.add_argument("--cache-dir", default=argparse.SUPPRESS,
                         help="where the caches live (also accepted before the command)")
    for name, text in (("info", "one cache in full"), ("rm", "delete a cache"),
                       ("verify", "re-read every done sample")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("cache", help="cache id (as `list` prints it) or path")
        sub.add_argument("--cache-dir", default=argparse.SUPPRESS,
                         help="where the caches live (also accepted before the command)")
        if name == "verify":
            sub.add_argument("--repair", action="store_true",
                             help="mark bad samples not done, so extraction redoes them")
    args = parser.parse_args(argv)
    return run_command(lambda: _run(args), resume="run the same command again (a cache is "
                       "changed only under its lock, by renames and whole chunk writes)")


def _list(cache_dir: str) -> int:
    """One line per cache; a damaged one is named and the others still listed."""
    from pipeline.cache.signature import describe
    from pipeline.cache.store import CacheError, FeatureCache

    paths = sorted(p for p in Path(cache_dir).glob("*.zarr") if p.is_dir())
    if not paths:
        print(f"no caches under {Path(cache_dir).resolve()}")
    damaged = 0
    for path in paths:
        try:
            cache = FeatureCache.open(path)
            done = cache.done()
            print(f"{cache.cache_id}  {int(done.sum())}/{len(done)} done  "
                  f"{_size(cache.size_on_disk())}  {describe(cache.signature)}")
        except CacheError as err:
            damaged += 1
            print(f"{path.stem}  DAMAGED: {err}")
    return 1 if damaged else 0


def _verify(path: Path, repair: bool) -> int:
    from pipeline.cache.store import DamagedCacheError, FeatureCache, writer_lock
    from pipeline.cache.verify import repair_index, verify

    cache = FeatureCache.open(path, mode="r+" if repair else "r")
    if repair:
        with writer_lock(path):
            for line in repair_index(cache):
                print(line)
    try:
        problems = verify(cache)
    except DamagedCacheError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for p in problems:
        print(f"row {p.row} key {p.key}: {p.problem}")
    if problems and repair:
        with writer_lock(path):
            cache.mark_undone([p.row for p in problems])
        print(f"{len(problems)} sample(s) marked not done; run `sam3-vessel extract` again to "
              "redo them")
    print(f"{int(cache.flagged().sum())} done samples checked, {len(problems)} bad")
    return 1 if problems and not repair else 0


def _run(args) -> int:
    from pipeline.cache.lock import removal_lock
    from pipeline.cache.store import FeatureCache, find_cache

    if args.command == "list":
        return _list(args.cache_dir)
    path = find_cache(args.cache, args.cache_dir, damaged=args.command == "rm")
    if args.command == "info":
        print(json.dumps(FeatureCache.open(path).summary(), indent=2))
        return 0
    if args.command == "rm":
        with removal_lock(path):
            shutil.rmtree(path)
        path.with_suffix(".lock").unlink(missing_ok=True)
        print(f"removed {path}")
        return 0
    return _verify(path, args.repair)
