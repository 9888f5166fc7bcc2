"""Checking a feature cache (`verify`: every sample flagged done re-read as training reads it)
and rebuilding its index (`repair_index`: damaged `keys` and `done` chunks), for
`python -m pipeline.cache verify [--repair]`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.cache.store import KEY_CHUNK, FeatureCache, unreadable


@dataclass(frozen=True)
class SampleProblem:
    row: int
    key: str
    problem: str


def verify(cache: FeatureCache) -> list[SampleProblem]:
    """Re-read every sample flagged done as training reads it; report those unreadable (a
    damaged chunk fails its checksum or its codec), without a chunk file (lost data) or not
    finite. A damaged `keys` or `done` raises `DamagedCacheError` (see `repair_index`)."""
    keys, done = cache.keys(), cache.flagged()
    problems = []
    missing = cache.missing_chunks(np.flatnonzero(done))
    for row in np.flatnonzero(done):
        row = int(row)
        if row in missing:
            problems.append(SampleProblem(row, keys[row], f"{missing[row]} chunk file missing"))
            continue
        for level in cache.levels:
            try:
                value = cache.read(row, [level])[level]
            except Exception as err:
                problems.append(SampleProblem(row, keys[row], f"{level} unreadable: "
                                              f"{type(err).__name__}: {str(err)[:120]}"))
                break
            if not np.isfinite(value).all():
                problems.append(SampleProblem(row, keys[row], f"{level} not finite"))
                break
    return problems


def repair_index(cache: FeatureCache) -> list[str]:
    """Rebuild damaged `keys` and `done` chunks (call under `writer_lock`, mode "r+").

    A damaged done flag is derivable: it is cleared and extraction redoes that sample. Lost
    or damaged keys are not (which image a row holds is known only from its key): those rows
    lose their key and their flag, and extraction gives their images rows again. Returns
    one line per repair."""
    array, done, lines = cache.array("keys"), cache.array("done"), []
    n, folder = array.shape[0], cache.path / "keys" / "c"
    keys = np.full(n, "", dtype=object)
    for c in range(-(-n // KEY_CHUNK)):
        lo, hi = c * KEY_CHUNK, min(n, (c + 1) * KEY_CHUNK)
        try:
            if not (folder / str(c)).is_file():
                raise FileNotFoundError(folder / str(c))
            keys[lo:hi] = np.asarray(array[lo:hi], dtype=object)
        except Exception as err:  # noqa: BLE001 - lost or damaged: these keys are gone
            lines.append(f"rows {lo}-{hi - 1}: keys chunk {folder / str(c)} "
                         f"{'lost' if isinstance(err, FileNotFoundError) else 'damaged'}; "
                         "which image each row held cannot be derived: the rows are freed "
                         "and their images will be extracted again")
    seen: dict[str, int] = {}
    for row, key in enumerate(keys):
        if key and key in seen:
            lines.append(f"rows {seen[key]} and {row}: the same key; both freed")
            keys[[seen[key], row]] = ""
        elif key:
            seen[key] = row
    freed = [r for r in range(n) if not keys[r]]
    if lines:
        array[:] = keys
    kept = sorted(set(range(n)) - set(freed))
    bad_flags = [] if not unreadable(done, slice(0, n)) else [
        r for r in kept if unreadable(done, r)]  # one by one only when some are damaged
    for row in bad_flags:
        lines.append(f"row {row}: done flag damaged; cleared, extraction redoes the sample")
    for row in freed + bad_flags:
        done[row] = False
    return lines
