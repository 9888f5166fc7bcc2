"""Fine-tune SAM 3 for view-conditioned vessel segmentation from a reusable feature cache.

The public entry points, imported on first use (importing sam3 takes seconds):

- `build_backbone(name, checkpoint=None, adapter=None)`: SAM 3's vision backbone
- `FeatureCache`: open, query and read feature caches (`pipeline.cache.store`)
- `ExtractConfig`, `run_extraction`: Stage A (`pipeline.config`, `pipeline.extraction`)
- `TrainConfig`, `train`: Stage B (`pipeline.config`, `pipeline.train.launch`)
"""

import os
from importlib import import_module

# PyTorch's CPU allocator backs tensors of 2 MB and more with transparent huge pages when this is
# set. Without it a step's large activations (e.g. 16 x 16 x 252 x 252 floats) come from fresh
# mmap'd 4 KB pages on every step, and CPU training spends much of its time in page faults
# (BENCHMARKS.md, "Page faults"). Read by torch at its first large allocation, so setting it
# here, before any training, is enough; a value the user set is kept.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

_EXPORTS = {
    "build_backbone": "pipeline.model.backbone",
    "FeatureCache": "pipeline.cache.store",
    "ExtractConfig": "pipeline.config",
    "TrainConfig": "pipeline.config",
    "run_extraction": "pipeline.extraction",
    "train": "pipeline.train.launch",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
