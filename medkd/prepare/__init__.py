"""``python -m medkd prepare``: turn a common data layout into the datalist the bundles read.

* ``prepare classification``: an image-folder layout, ``<root>/<split>/<class>/*`` or ``<root>/<class>/*``
  (:func:`~medkd.prepare.classification.prepare_classification`).
* ``prepare segmentation``: images plus masks found by a pair of glob patterns
  (:func:`~medkd.prepare.segmentation.prepare_segmentation`).

Both write ``dataset.json`` (Decathlon lists with a ``labels`` map), ``prepare.json`` (settings and every decision)
and ``sources.csv`` (each entry's source files and group) into ``--output``, and print what they decided.
"""

from __future__ import annotations

import argparse
from typing import Any

from medkd.data.duplicates import DEFAULT_MAX_DISTANCE
from medkd.data.loading import DataError
from medkd.prepare.classification import prepare_classification
from medkd.prepare.output import Prepared, report_lines
from medkd.prepare.segmentation import prepare_segmentation

__all__ = ["add_prepare_parser", "prepare_classification", "prepare_command", "prepare_segmentation"]


def _numbers(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from e


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", required=True, help="folder of the data set as downloaded")
    p.add_argument("--output", required=True, help="folder for dataset.json, prepare.json and written images")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="share of the images held out for validation when there is no validation split (default 0.1)",
    )
    p.add_argument(
        "--test-fraction",
        type=float,
        default=0.0,
        help="share of the images held out for testing when there is no test split (default 0)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random hold-outs (default 0)")
    p.add_argument(
        "--group-by",
        default=None,
        help="regular expression searched in each image's path (relative to --root); images with the same match "
        "(its first (group) if it has one) are never in two splits, e.g. 'sub-(rat\\d+)'",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an earlier prepare's output in --output")


def add_prepare_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``prepare`` sub-command (with ``classification`` and ``segmentation`` layouts)."""
    p = subparsers.add_parser(
        "prepare",
        help="turn an image-folder or images+masks layout into a datalist",
        description="Write dataset.json (and the images the bundles need) from a common data layout.",
    )
    layouts = p.add_subparsers(dest="layout", metavar="LAYOUT", required=True)
    _add_classification_parser(layouts)
    _add_segmentation_parser(layouts)
    return p


def _add_classification_parser(layouts: Any) -> None:
    c = layouts.add_parser(
        "classification",
        help="<root>/<split>/<class>/* or <root>/<class>/*",
        description="Image-folder classification: class names from the folder names (sorted), splits from folders "
        "named Training/train, Validation/val, Testing/test, else stratified hold-outs.",
    )
    _common(c)
    c.add_argument(
        "--keep-channels",
        action="store_true",
        help="reference colour images as they are (default: write greyscale copies for the 1-channel bundles)",
    )
    c.add_argument("--copy", action="store_true", help="write every image into --output (as PNG), not only converted")
    c.add_argument(
        "--duplicates",
        choices=("group", "drop", "ignore"),
        default="group",
        help="near-duplicate images: keep each group in one split when holding out (group, default), keep one image "
        "per group preferring test, then validation (drop), or do not look (ignore)",
    )
    c.add_argument(
        "--duplicate-distance",
        type=int,
        default=DEFAULT_MAX_DISTANCE,
        help=f"largest perceptual-hash distance (of 256 bits) of near-duplicates; -1: exact only "
        f"(default {DEFAULT_MAX_DISTANCE})",
    )
    c.set_defaults(handler=prepare_command)


def _add_segmentation_parser(layouts: Any) -> None:
    s = layouts.add_parser(
        "segmentation",
        help="2D images plus masks matched by a pair of patterns",
        description="Images plus masks: pairs by equal wildcard text in --images and --masks; greyscale NIfTI images "
        "and class-index label maps with the pixel spacing in the affine.",
    )
    _common(s)
    s.add_argument("--images", required=True, help="glob of the images, relative to --root, e.g. 'sub-*/micr/*.png'")
    s.add_argument(
        "--masks",
        required=True,
        help="glob of the masks with the same wildcards, matching the same text as in the image path, e.g. "
        "'derivatives/labels/sub-*/micr/*_SEM_seg-axonmyelin-manual.png'",
    )
    s.add_argument(
        "--mask-values",
        type=_numbers,
        default=None,
        help="mask value of each class in order, e.g. 0,127,255 -> classes 0,1,2 (default: masks hold 0..N-1)",
    )
    s.add_argument("--no-snap", action="store_true", help="a mask value not in --mask-values is an error (default: "
                   "mapped to the nearest listed value, and reported)")  # fmt: skip
    s.add_argument("--class-names", type=_names, default=None, help="class names in order, e.g. background,myelin,axon")
    s.add_argument(
        "--split",
        nargs="+",
        default=None,
        metavar="SPLIT=GROUPS",
        help="groups of each split, e.g. train=rat1,rat3 val=rat4 test=rat2 (unlisted groups go to training unless "
        "train= is given), or fractions, e.g. train=0.7 val=0.15 test=0.15",
    )
    s.add_argument(
        "--pixel-size",
        type=_numbers,
        default=None,
        help="resample every image to this pixel size (one number, or x,y), in the unit of the sidecars",
    )
    s.add_argument("--pixel-size-key", default="PixelSize", help="sidecar key of the pixel size (default PixelSize)")
    s.add_argument(
        "--source-pixel-size",
        type=_numbers,
        default=None,
        help="pixel size of the images that have no sidecar with --pixel-size-key",
    )
    s.add_argument(
        "--crop", type=int, default=None, help="keep the central N x N pixels of each image (after resampling)"
    )
    s.add_argument("--tile", type=int, default=None, help="cut square tiles of this many pixels (after resampling)")
    s.add_argument("--tile-overlap", type=int, default=0, help="pixels shared by neighbouring tiles (default 0)")
    s.add_argument(
        "--format",
        choices=("nifti", "png"),
        default="nifti",
        help="output files: nifti (.nii.gz, spacing in the affine; default) or png (no spacing)",
    )
    s.set_defaults(handler=prepare_command)


def run_prepare(args: argparse.Namespace) -> Prepared:
    """Run the layout ``args`` names and return what it prepared (files written, nothing printed)."""
    if args.layout == "classification":
        return prepare_classification(
            args.root,
            args.output,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            seed=args.seed,
            group_by=args.group_by,
            greyscale=not args.keep_channels,
            copy=args.copy,
            duplicates=args.duplicates,
            duplicate_distance=args.duplicate_distance,
            overwrite=args.overwrite,
        )
    return prepare_segmentation(
        args.root,
        args.output,
        images=args.images,
        masks=args.masks,
        mask_values=args.mask_values,
        class_names=args.class_names,
        snap=not args.no_snap,
        group_by=args.group_by,
        split=args.split,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        seed=args.seed,
        pixel_size=args.pixel_size,
        pixel_size_key=args.pixel_size_key,
        source_pixel_size=args.source_pixel_size,
        crop=args.crop,
        tile=args.tile,
        tile_overlap=args.tile_overlap,
        file_format=args.format,
        overwrite=args.overwrite,
    )


def prepare_command(args: argparse.Namespace) -> int:
    """Run ``prepare``: write the datalist and print every decision; ``ERROR: ...`` and 1 on a user error."""
    try:
        prepared = run_prepare(args)
    except DataError as e:
        print(f"ERROR: {e}")
        return 1
    print("\n".join(report_lines(prepared)))
    return 0
