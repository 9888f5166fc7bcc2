"""Stage B's `--cache ID_OR_PATH`: a run pointed at a cache takes the settings its features
depend on from the cache's signature, as nanoGPT's `train.py` reads shapes from `meta.pkl`.

Read from the signature: the backbone (and so the resolution), the cached levels, `--amp` and
`--cache-block`, and the cache folder. A flag the user gives as well must agree; the checkpoint
and adapter (known by their digests) must give the same signature, which `check_agrees` checks.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from pipeline.cache.store import CacheError, FeatureCache, find_cache
from pipeline.config import TrainConfig
from pipeline.errors import UsageError


class CacheMismatchError(UsageError, CacheError):
    """Flags that contradict the signature of the cache named by `--cache` (exit status 2)."""


def from_cache(config: TrainConfig, given: set[str] | dict) -> TrainConfig:
    """`config` with the backbone, levels, amp, cache block and cache folder of `config.cache`
    read from its signature. `given` names the fields the user set; each must agree."""
    path = find_cache(config.cache, config.cache_dir).resolve()
    signature = FeatureCache.open(path).signature
    block = signature.get("cache_block")
    read = {"backbone": signature["backbone"], "amp": signature["amp"], "cache_block": block,
            "cache_dir": str(path.parent)}
    if block is None:  # a split cache stores tokens: the decoder's levels stay the flag's
        read["levels"] = tuple(sorted(signature["levels"]))
    for name, value in read.items():
        mine = getattr(config, name)
        if name == "cache_dir":
            mine, value = Path(mine).resolve(), Path(value)
        if name in given and mine != value:
            flag = "--" + name.replace("_", "-")
            raise CacheMismatchError(
                f"{flag} {_shown(getattr(config, name))} disagrees with --cache {config.cache}, "
                f"whose features were made with {name} {_shown(read[name])}; drop {flag} or "
                "name a cache made with it (`sam3-vessel cache list`)")
    return replace(config, **read)


def check_agrees(config: TrainConfig, signature: dict) -> None:
    """Refuse a run whose features (`signature`, from its flags: checkpoint and adapter
    digests, versions, preprocessing) differ from those of the cache `--cache` names."""
    made = FeatureCache.open(find_cache(config.cache, config.cache_dir)).signature
    differ = [k for k in sorted(set(made) | set(signature)) if made.get(k) != signature.get(k)]
    if differ:
        key = differ[0]
        raise CacheMismatchError(
            f"--cache {config.cache} holds features made with {key} {_shown(made.get(key))}, "
            f"but this run's flags give {_shown(signature.get(key))}"
            f"{' (--checkpoint)' if key == 'checkpoint_sha256' else ''}"
            f"{' (--adapter)' if key == 'adapter_sha256' else ''}; pass the flags the cache was "
            "made with, or name another cache")


def _shown(value) -> str:
    return ",".join(value) if isinstance(value, (tuple, list)) else str(value)
