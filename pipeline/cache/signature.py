"""A cache's signature: everything its features depend on, and the id derived from it.

Two runs with equal signatures produce the same features (up to the device's rounding), so they
share one cache whatever their manifests; any difference gives another cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from pipeline.data.manifest import file_sha256

PROJECT = "sam3-vessel-cache"
DIGEST_MEMO = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / PROJECT


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def checkpoint_digest(path: Path | None) -> str | None:
    """sha256 of a checkpoint file (sam3.pt is 3.4 GB: BENCHMARKS.md times the hash),
    memoised by path, device, inode, size, mtime and ctime. A copy over the file that keeps
    the timestamps (`cp -p`, rsync -t) cannot set its ctime, so it is hashed again."""
    if path is None:
        return None
    stat = path.stat()
    memo_key = (f"{path.resolve()}:{stat.st_dev}:{stat.st_ino}:{stat.st_size}:"
                f"{stat.st_mtime_ns}:{stat.st_ctime_ns}")
    memo = DIGEST_MEMO / (hashlib.sha256(memo_key.encode()).hexdigest()[:32] + ".sha256")
    if memo.is_file():
        return memo.read_text().strip()
    digest = file_sha256(path)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(digest)
    except OSError:
        pass  # a read-only home only costs a re-hash next time
    return digest


def build_signature(
    *, backbone: str, checkpoint: Path | None, adapter: str | Path | None, amp: str,
    levels: tuple[str, ...], cache_block: int | None = None,
) -> dict:
    """The signature dict of features made by this backbone, adapter and preprocessing.

    With `cache_block` K (a split cache of the trunk's tokens after block K) the signature holds
    K, and the adapter only if it reaches block K or earlier: experiments whose adapter lives
    after K share one cache whatever its rank, weights or seed. Without a split there is no
    `cache_block` key, so caches made before splits existed keep their ids.
    """
    import torch  # here, so that reading caches (`python -m pipeline.cache`) stays light

    from pipeline.data.images import preprocessing_signature
    from pipeline.model.backbone import PRESETS, cache_levels
    from pipeline.model.lora import adapter_changes_tokens, adapter_digest

    preset = PRESETS[backbone]
    split = {} if cache_block is None else {"cache_block": cache_block}
    return {
        "backbone": backbone,
        "checkpoint_sha256": checkpoint_digest(checkpoint),
        "adapter_sha256": adapter_digest(adapter) if adapter_changes_tokens(adapter, cache_block)
        else None,
        **split,
        "resolution": preset.resolution,
        "preprocessing": preprocessing_signature(),
        "amp": amp,
        "levels": sorted(cache_levels(levels, cache_block)),
        "versions": {
            "sam3": package_version("sam3"),
            "torch": torch.__version__.split("+")[0],
            PROJECT: package_version(PROJECT),
        },
    }


def signature_digest(signature: dict) -> str:
    return hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()


def cache_id(signature: dict) -> str:
    """A readable, signature-derived name such as `sam3-0f3a9c2b71d4`."""
    return f"{signature['backbone']}-{signature_digest(signature)[:12]}"


def describe(signature: dict) -> str:
    """One line summarising a signature for listings."""
    adapter = signature.get("adapter_sha256")
    ckpt = signature.get("checkpoint_sha256")
    return (
        f"{signature['backbone']} @{signature['resolution']}px "
        f"ckpt={ckpt[:8] if ckpt else 'seeded'} adapter={adapter[:8] if adapter else 'none'} "
        f"amp={signature['amp']} levels={','.join(signature['levels'])}"
    )
