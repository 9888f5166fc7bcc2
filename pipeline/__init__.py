"""Fine-tune SAM 3 for view-conditioned vessel segmentation from a reusable feature cache.

The public entry points, imported on first use (importing sam3 takes seconds):

- `build_backbone(name, checkpoint=None, adapter=None)`: SAM 3's vision backbone
- `FeatureCache`: open, query and read feature caches (`pipeline.cache.store`)
- `ExtractConfig`, `run_extraction`: Stage A (`pipeline.config`, `pipeline.extraction`)
- `TrainConfig`, `train`: Stage B (`pipeline.config`, `pipeline.train.launch`)
"""

from importlib import import_module

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
