"""Data: the manifest CSV, importers, image and DICOM readers, checks, augmented copies, the
synthetic demo set (and `--data demo`), and Stage B's samples. The lowest layer above
`pipeline.errors` and `pipeline.durable` (tests/test_layout.py checks the layers)."""
