"""`sam3-vessel`: one installed command, one sub-command per job, from any folder.

    sam3-vessel data import folder IMAGES --masks MASKS --out manifest.csv
    sam3-vessel extract --data manifest.csv          # Stage A (extract_features.py)
    sam3-vessel train --data manifest.csv            # Stage B (train_head.py)
    sam3-vessel predict --run runs/x --data new.csv --out predictions/
    sam3-vessel runs compare 'runs/*'
    sam3-vessel export --run runs/x --checkpoint sam3.pt --out sam3_vessels.pt
    sam3-vessel cache list

Each sub-command is the `main` of the module named in `COMMANDS`, imported only when it runs:
`sam3-vessel --help` imports none of them.
"""

from __future__ import annotations

import sys
from importlib import import_module

COMMANDS = {
    "data": ("pipeline.data.cli", "main", "import a dataset into a manifest, or check one"),
    "extract": ("pipeline.cli", "extract_main", "Stage A: backbone features into the cache"),
    "train": ("pipeline.cli", "train_main", "Stage B: train the decoder (and LoRA) from it"),
    "predict": ("pipeline.cli", "predict_main", "vessel masks for new images or DICOM runs"),
    "runs": ("pipeline.runs", "main", "compare training runs"),
    "export": ("pipeline.cli", "export_main", "SAM 3's checkpoint with a run's LoRA merged"),
    "cache": ("pipeline.cache.cli", "main", "list, inspect, verify or remove feature caches"),
}
"""Sub-command -> (module, its main function, one line of help), in the order of a project."""
PROG = "sam3-vessel"


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name.ljust(width)}  {text}" for name, (_, _, text) in COMMANDS.items()]
    return (f"usage: {PROG} COMMAND [--help | flags] | --version\n\n"
            "Fine-tune SAM 3 for vessel segmentation from a reusable feature cache.\n\n"
            "commands:\n" + "\n".join(lines) + f"\n\n`{PROG} COMMAND --help` lists a command's "
            "flags.")


def main(argv: list[str] | None = None) -> int:
    """Run the sub-command `argv[0]` with the rest of `argv`; its exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        from importlib.metadata import version

        print(f"{PROG} {version('sam3-vessel-cache')}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        print(f"{usage()}\n{PROG}: error: unknown command {name!r}{hint}", file=sys.stderr)
        return 2
    module, function, _ = COMMANDS[name]
    return getattr(import_module(module), function)(rest, prog=f"{PROG} {name}")


if __name__ == "__main__":
    sys.exit(main())
