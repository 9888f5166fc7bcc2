"""Stage B's preparation: what needs no GPU (manifest check, cache lookup, run directory),
the resumable settings of a run, and seeding. `pipeline.train.launch.train` runs it, then the
step loop (`pipeline.train.loop`) once per process.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pipeline.cache.store import CacheLockedError, FeatureCache, cache_path
from pipeline.config import DECODER_ONLY, ExtractConfig, TrainConfig
from pipeline.data.augment import VERSION, extraction_jobs
from pipeline.data.checks import check_manifest
from pipeline.data.demo import data_manifest
from pipeline.data.manifest import Sample, read_manifest
from pipeline.data.samples import ViewVocabulary, split_samples
from pipeline.distributed import (
    DistributedContext,
)
from pipeline.errors import UserError
from pipeline.extraction import SIGNATURE_FIELDS, cache_signature, run_extraction
from pipeline.train.cache_choice import check_agrees
from pipeline.train.checkpoint import saved_step
from pipeline.train.reporting import write_json
from pipeline.train.run_files import (
    RunDirError,
    check_resumable_manifest,
    claim_run_dir,
    manifest_record,
    resume_changes,
)


class MissingFeaturesError(UserError, RuntimeError):
    """The cache of this model, adapter and preprocessing lacks images of the manifest."""


RESUMABLE = frozenset({"steps", "epochs", "val_every", "cache_dir", "loader_workers",
                       "memory_cache_mb", "extract_missing"})
"""The only flags that `--resume` lets differ from the run's own: a longer (or shorter) budget in
steps or epochs (the cosine schedule stretches to the new total), the validation interval, a
cache folder that moved, loader processes and memory, and whether missing features are
extracted. Any other differing flag is refused, by name."""


@dataclass
class Prepared:
    """What every training process needs, computed once before any GPU work."""

    config: TrainConfig
    run_dir: Path
    train: list[Sample]
    val: list[Sample]
    train_keys: list[str]
    val_keys: list[str]
    views: ViewVocabulary
    cache: Path
    signature: dict


FIELDS_ADDED = {"image_channels": 16, "decoder": "legacy"}
"""TrainConfig fields added after runs were made, with the value those runs used (a config.json
without the field is read with it, so --resume and predict rebuild the same model)."""


def default_run_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def ensure_cache(config: TrainConfig, keys: list[str], samples: list[Sample],
                 adapter: str | None = None) -> tuple[Path, dict]:
    """The cache holding every key's features for `config` (and `adapter`), extracting if asked.
    `config.augment_copies` must be resolved (`prepare` does it, from the manifest)."""
    extract = config.extract_config(adapter=adapter)
    signature = cache_signature(extract)
    if config.cache:
        check_agrees(config, signature)
    path = cache_path(config.cache_dir, signature).resolve()  # runs may move; the cache does not
    cache = FeatureCache.find(config.cache_dir, signature)
    jobs = extraction_jobs(samples, keys, config.copy_plan)
    wanted = list(jobs)
    lacking = wanted if cache is None else [
        k for k, (r, d) in zip(wanted, _rows_done(cache, wanted), strict=True) if r < 0 or not d]
    if lacking and config.extract_missing:
        try:
            run_extraction(extract, samples, keys)
        except CacheLockedError as err:
            raise CacheLockedError(f"{str(err).split(';')[0]}; wait for that run to finish and "
                                   "run this command again") from None
    elif lacking:
        command = _extract_command(extract)
        state = "does not exist" if cache is None else _lacking(lacking, jobs)
        what = "its features" if cache is None else "the missing images"
        copies_only = cache is not None and all(jobs[k][1] for k in lacking)
        advice = (f"\nIt holds the images but not the {config.augment_copies} augmented copies "
                  "of each training image this run asks for (--augment-copies): pass "
                  "--augment-copies 0 to train without them (as the cache was extracted), or "
                  "extract them:" if copies_only else f" Extract {what} first:")
        raise MissingFeaturesError(
            f"the feature cache {path} {state}.{advice}\n  {command}\n"
            f"or rerun with --extract-missing.{_other_caches(config.cache_dir, path, signature)}")
    return path, signature


def _lacking(lacking: list[str], jobs: dict[str, tuple[str, str | None]], shown: int = 3) -> str:
    """"lacks N of M images (first few named)", images and augmented copies counted apart."""
    def name(key: str) -> str:
        image, copy = jobs[key]
        return image if copy is None else f"{image} (copy {copy})"

    named = ", ".join(map(name, lacking[:shown])) + (", ..." if len(lacking) > shown else "")
    copies = sum(1 for k in jobs if jobs[k][1])
    if not copies:
        return f"lacks {len(lacking)} of {len(jobs)} images ({named})"
    lacking_copies = sum(1 for k in lacking if jobs[k][1])
    return (f"lacks {len(lacking)} of {len(jobs)} rows: {len(lacking) - lacking_copies} of "
            f"{len(jobs) - copies} images and {lacking_copies} of {copies} augmented copies "
            f"({named})")


def _other_caches(cache_dir: str, wanted: Path, signature: dict, shown: int = 5) -> str:
    """The caches beside `wanted` that --cache could train on instead (the same checkpoint and
    adapter, other levels, amp or backbone settings), each a line; "" when there are none."""
    from pipeline.cache.signature import describe

    lines = []
    for other in sorted(Path(cache_dir).glob("*.zarr")):
        if other.resolve() == wanted:
            continue
        try:
            cache = FeatureCache.open(other)
            if any(cache.signature.get(k) != signature.get(k)
                   for k in ("checkpoint_sha256", "adapter_sha256")):
                continue  # another model: --cache would refuse it
            lines.append(f"  {cache.cache_id}  {int(cache.done().sum())} rows  "
                         f"{describe(cache.signature)}")
        except UserError:  # a damaged cache: `cache list` names it
            continue
    if not lines:
        return ""
    more = f"\n  ... and {len(lines) - shown} more (sam3-vessel cache list)" if (
        len(lines) > shown) else ""
    return (f"\nOther caches in {cache_dir}, made with other settings (--cache ID trains on one, "
            "with its backbone, levels and amp):\n" + "\n".join(lines[:shown]) + more)


def _rows_done(cache: FeatureCache, keys: list[str]):
    rows, done = cache.done_for(keys)
    return [(int(r), bool(d)) for r, d in zip(rows, done, strict=True)]


_SHOWN = {"data", "backbone", "levels", "amp", "cache_dir"}  # always named, default or not
_WITH_COPIES = {"augment", "augment_seed"}  # mean something only with augmented copies


def _extract_command(extract: ExtractConfig) -> str:
    """The `sam3-vessel extract` command that makes `extract`'s cache: every signature field
    (`SIGNATURE_FIELDS`, so a new one cannot be left out), where the keys come from (data, the
    copies) and the device, each only where it differs from its default or is in `_SHOWN`."""
    defaults = {f.name: f.default for f in fields(ExtractConfig)}
    parts = ["sam3-vessel extract"]
    for name in ("data", *SIGNATURE_FIELDS, "cache_dir", "augment_copies", *sorted(_WITH_COPIES),
                 "device"):
        value = getattr(extract, name)
        if name in _WITH_COPIES and not extract.augment_copies:
            continue
        if (value is None or value == "" or (name not in _SHOWN and value == defaults[name])
                or (name == "augment_copies" and not value)):  # 0 copies: none, as the default
            continue
        text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
        parts.append(f"--{name.replace('_', '-')} {text}")
    return " ".join(parts)


def prepare(config: TrainConfig, context: DistributedContext | None = None) -> Prepared:
    """Check the manifest, find the cache and create the run directory (no GPU work).

    Under torchrun every rank calls this (extraction, if needed, is shared); rank 0 writes.
    A new run records absolute paths and the manifest's rows (manifest.json) so that `--resume`
    reads the same data from anywhere; a resume refuses a manifest that changed.
    """
    context = context or DistributedContext()
    manifest = data_manifest(config.data, config.cache_dir)
    config = replace(config, data=str(manifest), cache_dir=str(Path(config.cache_dir).resolve()))
    samples = read_manifest(manifest)
    config = config.with_copies_for(samples)
    report = check_manifest(samples, require_masks=True)
    if report.warnings and report.ok and context.is_leader:
        print(report.format(), flush=True)
    report.raise_if_errors()  # `error: manifest check: ...` with every problem, once
    record = manifest_record(samples, report.keys)
    if config.resume:
        check_resumable_manifest(Path(config.resume), manifest, record)
    key_of = dict(zip(samples, report.keys, strict=True))
    train, val = split_samples(samples, allow_empty_val=config.allow_empty_val,
                               where=str(manifest))
    views = ViewVocabulary.from_samples(train)
    cache, signature = ensure_cache(config, report.keys, samples)
    run_dir = [str(Path(config.run_dir) if config.run_dir else default_run_dir())]
    if context.distributed:
        dist.broadcast_object_list(run_dir, src=0)  # ranks may disagree on the timestamp
    run_dir = Path(run_dir[0])
    config = replace(config, run_dir=str(run_dir))
    if config.resume:  # every rank refuses a budget below the run's step
        _record_resumed_budget(config, run_dir, len(train), write=context.is_leader)
    if context.is_leader and not config.resume:
        claim_run_dir(run_dir, overwrite=config.overwrite)
        write_json(run_dir / "manifest.json", record)
        write_json(run_dir / "config.json", {
            "config": asdict(config), "cache": {"id": cache.stem, "path": str(cache),
                                                "signature": signature},
            "views": list(views.labels), "samples": {"train": len(train), "val": len(val)},
            "manifest_sha256": record["sha256"], "augment_version": VERSION,
        })
    context.barrier()
    return Prepared(config, run_dir, train, val, [key_of[s] for s in train],
                    [key_of[s] for s in val], views, cache, signature)


def _record_resumed_budget(config: TrainConfig, run_dir: Path, train_samples: int, *,
                           write: bool) -> None:
    """Refuse a budget below the step the run reached; else (when `write`) write the resumed
    settings (the new budget above all) into config.json, and drop report.json when steps are
    left, since the run is not finished until it writes a new one."""
    step, total = saved_step(run_dir / "last.pt"), config.total_steps(train_samples)
    if total < step:
        asked = (f"--steps {config.steps}" if config.steps else
                 f"--epochs {config.epochs} ({total} steps)")
        raise RunDirError(f"--resume {run_dir}: the run is at step {step} (last.pt), past the "
                          f"{asked} asked for; give --steps above {step} to continue it, or "
                          "start a new run")
    if not write:
        return
    saved = json.loads((run_dir / "config.json").read_text())
    saved["config"] = {**asdict(config), "resume": saved["config"].get("resume")}
    write_json(run_dir / "config.json", saved)
    if total > step:
        (run_dir / "report.json").unlink(missing_ok=True)


def requested_fields(config: TrainConfig) -> dict:
    """The fields of `config` that differ from TrainConfig's defaults (for in-process callers,
    which pass a whole config)."""
    default = TrainConfig()
    return {f: getattr(config, f) for f in asdict(config)
            if getattr(config, f) != getattr(default, f)}


def resume_config(run_dir: str | Path, requested: dict | None = None) -> TrainConfig:
    """The saved configuration of a run, to continue it, with the `requested` values of the
    `RESUMABLE` fields; any other requested field that differs raises `RunDirError`."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise RunDirError(f"{run_dir}: no config.json, so not a run directory `sam3-vessel train` "
                          "made; check the path given to --resume")
    if not (run_dir / "last.pt").is_file():
        raise RunDirError(f"{run_dir}/last.pt does not exist: the run stopped before it saved its "
                          "first epoch, so there is nothing to resume; start it again with the "
                          f"same flags and --run-dir {run_dir} --overwrite")
    recorded = json.loads((run_dir / "config.json").read_text())
    saved, requested = recorded["config"], dict(requested or {})
    if requested.get("cache") and _cache_id(requested["cache"]) == (
            recorded.get("cache") or {}).get("id"):
        del requested["cache"]  # the run's own cache, by id or by another path to it
    for name, value in FIELDS_ADDED.items():  # a run from before the field keeps its behaviour
        saved.setdefault(name, value)
    for name in ("levels", "gpus"):
        saved[name] = tuple(saved[name])
    for name in DECODER_ONLY["legacy" if saved["decoder"] == "detail" else "detail"][1:]:
        saved.pop(name, None)  # the other decoder's fields: unread, and defaults change
    changes = resume_changes(run_dir, saved, requested, RESUMABLE)
    for budget, other in (("steps", "epochs"), ("epochs", "steps")):
        if changes.get(budget) and other not in changes:  # a budget in the other unit
            changes[other] = None
    saved.update(changes)
    saved.update(resume=str(run_dir), run_dir=str(run_dir))
    return TrainConfig(**{k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__})


def _cache_id(id_or_path: str) -> str:
    """The cache id `--cache` names: an id as given, or a cache folder's name."""
    return Path(str(id_or_path)).name.removesuffix(".zarr")


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
