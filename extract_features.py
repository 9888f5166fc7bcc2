"""Stage A: compute SAM 3 backbone features once and keep them in the feature cache.

    python extract_features.py --data demo --backbone tiny            # the CPU demo
    python extract_features.py --data manifest.csv --gpus 0,1         # every listed GPU
    python extract_features.py --data manifest.csv --levels 1x,2x,4x --adapter runs/x/adapter
    torchrun --nnodes 2 --nproc-per-node 8 ... extract_features.py --data manifest.csv

Images already in the cache of the same model, adapter and preprocessing are not extracted again;
a killed run resumes where it stopped.
"""

import argparse
import json
import os
import sys
from dataclasses import asdict

from pipeline.config import ExtractConfig, add_arguments, from_arguments
from pipeline.data.checks import check_manifest
from pipeline.data.demo import resolve_data
from pipeline.errors import run_command
from pipeline.extraction import run_extraction


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, ExtractConfig)
    try:
        config = from_arguments(ExtractConfig, parser.parse_args(argv))
    except ValueError as err:
        parser.error(str(err))
    return run_command(lambda: _extract(config), resume="run the same command again: images "
                       "already in the cache are kept, the others are extracted")


def _extract(config: ExtractConfig) -> int:
    samples = resolve_data(config.data, config.cache_dir)
    config = config.with_copies_for(samples)
    print("config:", json.dumps(asdict(config)), flush=True)
    report = check_manifest(samples, require_masks=False)
    if not report.ok:
        print(report.format(), file=sys.stderr)
        return 1
    summary = run_extraction(config, samples, report.keys)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 speaks for all
        print(f"cache {summary.cache_id} at {summary.path}")
        print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
