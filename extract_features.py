"""Stage A: compute SAM 3 backbone features once and keep them in the feature cache.

    python extract_features.py --data demo --backbone tiny            # the CPU demo
    python extract_features.py --data manifest.csv --gpus 0,1         # every listed GPU
    python extract_features.py --data manifest.csv --levels 1x,2x,4x --adapter runs/x/adapter
    torchrun --nnodes 2 --nproc-per-node 8 ... extract_features.py --data manifest.csv

The same as the installed `sam3-vessel extract` (which runs from any folder). Images already in
the cache of the same model, adapter and preprocessing are not extracted again; a killed run
resumes where it stopped. The recipe: `pipeline.cli.extract_main` parses and checks the flags
(`pipeline.config.ExtractConfig`), reads and checks the manifest, then
`pipeline.extraction.run_extraction` fills the cache.
"""

import sys

from pipeline.cli import extract_main

if __name__ == "__main__":
    sys.exit(extract_main())
