"""The data CLI: import a dataset into a manifest, or check a manifest before any GPU time.

    sam3-vessel data import folder IMAGES_DIR --out manifest.csv [--masks DIR] ...
    sam3-vessel data import coco ANNOTATIONS.json --images DIR --out manifest.csv \\
        --masks-out DIR [--categories a,b] ...
    sam3-vessel data import dicom DICOM_DIR --frames-out DIR --out manifest.csv \\
        [--masks DIR | --all-frames] ...
    sam3-vessel data check MANIFEST [--no-masks]          # or `demo`, the synthetic set

(`python -m pipeline.data ...` is the same.) Exit status 0 on success, 1 when the import fails
or the check finds errors; failures are one clean message naming the file, without a traceback.
The importers and readers (torch among their imports) load only once the flags are parsed and
the paths they name are found.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from collections import Counter
from pathlib import Path

from pipeline.data.manifest import UNKNOWN_VIEW, read_manifest
from pipeline.durable import write_atomically
from pipeline.errors import check_path, run_command


def _split_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="manifest CSV to write")
    parser.add_argument("--view-regex", help="view from the file name: first group or match")
    parser.add_argument("--split-ratio", type=float, default=0.8, help="train share (0.8)")
    parser.add_argument("--group-regex", help="keep files with the same first capture "
                        "(e.g. a patient id) in the same split")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (0)")


def build_parser(prog: str = "python -m pipeline.data") -> argparse.ArgumentParser:
    """The argument parser of `sam3-vessel data` (`python -m pipeline.data`)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    sources = commands.add_parser("import", help="write a manifest from a dataset on disk")
    kinds = sources.add_subparsers(dest="source", required=True)

    folder = kinds.add_parser("folder", help="a folder of images, optionally one of masks")
    folder.add_argument("images_dir")
    folder.add_argument("--masks", help="folder of masks, paired with images by key")
    folder.add_argument("--image-regex", help="image key: first capture group of this regex")
    folder.add_argument("--mask-regex", help="mask key: first capture group of this regex")
    folder.add_argument("--view-from-subfolder", action="store_true",
                        help="view = the image's immediate subfolder name")
    folder.add_argument("--split", dest="fixed_split",
                        help="write this split on every row instead of a random split")
    folder.add_argument("--allow-missing-masks", action="store_true",
                        help="keep images without a mask (empty mask column)")
    folder.add_argument("--append", action="store_true",
                        help="add the rows to an existing --out manifest instead of replacing "
                        "it (e.g. a dataset's training/ and test/ folders, each with --split)")
    folder.add_argument("--fov", help="folder of field-of-view masks (the `fov` column), "
                        "paired with images by key; scores count only pixels inside them")
    folder.add_argument("--fov-regex", help="FOV mask key: first capture group of this regex")
    _split_options(folder)

    coco = kinds.add_parser("coco", help="a COCO annotation file (e.g. ARCADE)")
    coco.add_argument("annotations")
    coco.add_argument("--images", required=True, help="folder the COCO file names are under")
    coco.add_argument("--masks-out", required=True, help="folder to write PNG masks to")
    coco.add_argument("--categories", help="comma-separated category names (default: all)")
    _split_options(coco)

    dicom = kinds.add_parser("dicom", help="a folder of DICOM files (e.g. XA cine runs)")
    dicom.add_argument("dicom_dir")
    dicom.add_argument("--frames-out", required=True, help="folder to write the PNG frames to")
    dicom.add_argument("--masks", help="folder of masks named <DICOM file stem>_<frame>.png "
                       "(frames from 1)")
    dicom.add_argument("--all-frames", action="store_true",
                       help="a row for every frame, not only the frames with a mask")
    dicom.add_argument("--image-regex", help="DICOM file key: first capture group of this "
                       "regex on its name (default: the stem)")
    dicom.add_argument("--mask-regex", help="groups (?P<key>...) and (?P<frame>...) on a "
                       "mask's name (default: <key>_<frame>.<suffix>, the key the DICOM "
                       "file's stem)")
    dicom.add_argument("--split", dest="fixed_split",
                       help="write this split on every row instead of the grouped split")
    dicom.add_argument("--out", required=True, help="manifest CSV to write")
    dicom.add_argument("--split-ratio", type=float, default=0.8,
                       help="train share (0.8), whole patients (Patient ID, else study) at once")
    dicom.add_argument("--seed", type=int, default=0, help="seed of the split (0)")

    check = commands.add_parser("check", help="read every row of a manifest and report problems")
    check.add_argument("manifest", help="a manifest CSV, or `demo` (the synthetic set)")
    check.add_argument("--cache-dir", default="cache",
                       help="where `demo` lives (<cache-dir>/demo-data, made on first use)")
    check.add_argument("--no-masks", action="store_true", help="masks are not required")
    check.add_argument("--threads", type=int, default=8, help="reader threads (8)")
    check.add_argument("--limit", type=int, default=100, help="lines shown per level (100)")
    return parser


def _check_paths(args: argparse.Namespace) -> None:
    """Every folder and file the command reads, found before any import of the readers."""
    if args.command == "check":
        if args.manifest != "demo":
            check_path(args.manifest, flag="check", what="manifest",
                       needs="`check` takes a manifest CSV or `demo`")
        return
    if args.source == "folder":
        check_path(args.images_dir, flag="import folder", kind="folder", what="image folder")
        for flag in ("masks", "fov"):
            if getattr(args, flag):
                check_path(getattr(args, flag), flag=f"--{flag}", kind="folder")
    elif args.source == "coco":
        check_path(args.annotations, flag="import coco", what="annotation file")
        check_path(args.images, flag="--images", kind="folder")
    else:
        check_path(args.dicom_dir, flag="import dicom", kind="folder")
        if args.masks:
            check_path(args.masks, flag="--masks", kind="folder")


def _import(args: argparse.Namespace) -> int:
    if args.source == "dicom":
        from pipeline.data.dicom_import import import_dicom

        result = import_dicom(args.dicom_dir, args.out, frames_dir=args.frames_out,
                              masks_dir=args.masks, all_frames=args.all_frames,
                              image_regex=args.image_regex, mask_regex=args.mask_regex,
                              split_ratio=args.split_ratio, split_column=args.fixed_split,
                              seed=args.seed)
        for note in result.notes:
            print(f"note: {note}")
        return _summary(result.manifest)
    common = dict(view_regex=args.view_regex, split_ratio=args.split_ratio,
                  group_regex=args.group_regex, seed=args.seed)
    if args.source == "folder":
        from pipeline.data.importers import import_folder

        target = Path(args.out)
        # Appending: import beside the manifest (same folder, so relative paths stay valid).
        fresh = target.with_name(f".{target.stem}.append.csv") if args.append else target
        out = import_folder(args.images_dir, fresh, masks_dir=args.masks,
                            image_regex=args.image_regex, mask_regex=args.mask_regex,
                            view_from_subfolder=args.view_from_subfolder,
                            split_column=args.fixed_split,
                            allow_missing_masks=args.allow_missing_masks,
                            fov_dir=args.fov, fov_regex=args.fov_regex, **common)
        if args.append:
            out = _append_rows(target, fresh)
    else:
        from pipeline.data.coco import import_coco

        categories = [c.strip() for c in args.categories.split(",")] if args.categories else None
        out = import_coco(args.annotations, args.images, args.out, masks_out_dir=args.masks_out,
                          categories=categories, **common)
    return _summary(out)


def _summary(out) -> int:
    samples = read_manifest(out)
    splits = Counter(s.split or "-" for s in samples)
    views = Counter(s.view or UNKNOWN_VIEW for s in samples)
    masks = sum(s.mask is not None for s in samples)
    fovs = sum(s.fov is not None for s in samples)
    print(f"wrote {out}: {len(samples)} rows, {masks} with masks"
          f"{f', {fovs} with a field of view' if fovs else ''}; "
          f"splits {dict(sorted(splits.items()))}; views {dict(sorted(views.items()))}")
    print(f"next: check every row: sam3-vessel data check {out}")
    return 0


def _append_rows(target: Path, fresh: Path) -> Path:
    """`target` with the rows of `fresh` (a manifest in the same folder) added; removes `fresh`."""
    tables = []
    for path in (target, fresh):
        if not path.is_file():
            continue
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            tables.append((list(reader.fieldnames or []), list(reader)))
    columns = list(dict.fromkeys(c for header, _ in tables for c in header))
    handle = io.StringIO(newline="")
    writer = csv.DictWriter(handle, fieldnames=columns, restval="")
    writer.writeheader()
    for _, rows in tables:
        writer.writerows(rows)
    write_atomically(target, handle.getvalue().encode("utf-8"))
    fresh.unlink()
    return target


def _check(args: argparse.Namespace) -> int:
    from pipeline.data.checks import check_manifest
    from pipeline.data.demo import data_manifest

    manifest = data_manifest(args.manifest, args.cache_dir)
    samples = read_manifest(manifest)
    report = check_manifest(samples, require_masks=not args.no_masks, threads=args.threads)
    print(f"{args.manifest}: " + report.format(limit=args.limit))
    if report.ok:
        print(f"next: extract its features: sam3-vessel extract --data {args.manifest} "
              "(--backbone tiny for a demo without SAM 3's weights)")
    return 0 if report.ok else 1


def main(argv: list[str] | None = None, prog: str = "python -m pipeline.data") -> int:
    """Run the CLI; the exit status (0 success, 1 failure or check errors, 2 usage)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.command == "import" and args.source == "folder" and (
            args.view_regex and args.view_from_subfolder):
        parser.error("give --view-regex or --view-from-subfolder, not both")

    def run() -> int:
        _check_paths(args)
        return _import(args) if args.command == "import" else _check(args)

    return run_command(run, resume="nothing is left half-written; run the same command again")


if __name__ == "__main__":
    sys.exit(main())
