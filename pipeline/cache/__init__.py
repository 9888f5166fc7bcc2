"""The feature cache and Stage A: the signature, the writer's lock, chunk files, `FeatureCache`
(the one module that knows the zarr layout), per-batch feature reads, and the extraction that
fills it. `python -m pipeline.cache` looks after caches."""
