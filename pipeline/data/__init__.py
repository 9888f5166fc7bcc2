"""Data: the manifest CSV, importers, image and DICOM readers, checks, augmented copies, the
synthetic demo set, and Stage B's samples. The bottom layer: imports nothing else of `pipeline`
but `pipeline.errors` and `pipeline.durable`."""
