"""Model: SAM 3's vision backbone, its LoRA adapter, the view-conditioned decoder, the segmenter
that joins them, and the loss. Reads images through `pipeline.data`; knows nothing of caches."""
