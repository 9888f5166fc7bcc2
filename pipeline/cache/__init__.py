"""The feature cache: its signature, the writer's lock, chunk files, `FeatureCache` (the one
module that knows the zarr layout) and per-batch feature reads. Stage A, which fills it, is
`pipeline.extraction`; `python -m pipeline.cache` looks after caches."""
