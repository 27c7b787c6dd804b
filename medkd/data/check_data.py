"""``python -m medkd check-data``: check every list of a datalist and print every problem (:func:`check_data_command`),
and find exact and near-duplicate images within and across its lists (:mod:`medkd.data.duplicates`)."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medkd.data.checks import TASKS, accept_missing_classes, check_datalist, format_problems, infer_task
from medkd.data.datalists import csv_lists, load_datalist
from medkd.data.duplicates import DEFAULT_MAX_DISTANCE, find_duplicates
from medkd.data.held_out import nnunet_raw, nnunet_training
from medkd.data.labels import optional_class_names, optional_label_values
from medkd.errors import DataError

__all__ = ["add_check_data_parser", "check_data_command"]


def add_check_data_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``check-data`` sub-command on an ``argparse`` sub-parsers object."""
    p = subparsers.add_parser(
        "check-data",
        help="check a datalist before training",
        description="Check every file of a datalist and print all problems (exit code 1 when any).",
    )
    p.add_argument("--datalist", required=True, help="Decathlon-style .json or .csv (image,label) datalist")
    p.add_argument(
        "--key",
        default="training",
        help="list(s) to check in a JSON datalist: a name, comma-separated names, or 'all' for every list, which "
        "also finds duplicates across lists (leakage) (default: training)",
    )
    p.add_argument("--num-classes", type=int, default=None, help="number of classes including background")
    p.add_argument(
        "--task",
        choices=TASKS,
        default=None,
        help="default: classification when every label is an integer class index, else segmentation",
    )
    p.add_argument("--class-names", default=None, help="comma-separated class names, e.g. background,liver,tumour")
    p.add_argument("--base-dir", default=None, help="folder relative paths start from (default: the datalist's)")
    p.add_argument(
        "--allow-missing-classes",
        action="store_true",
        help="report a class without samples as a warning, not a problem (e.g. a small validation split)",
    )
    dup = p.add_argument_group("duplicates (exact pixels, or near: perceptual hash)")
    dup.add_argument(
        "--duplicate-distance",
        type=int,
        default=DEFAULT_MAX_DISTANCE,
        help=f"largest perceptual-hash distance (of 256 bits) of near-duplicates; -1: exact duplicates only "
        f"(default: {DEFAULT_MAX_DISTANCE})",
    )
    dup.add_argument("--no-duplicates", action="store_true", help="skip the search for duplicate images")
    dup.add_argument(
        "--allow-duplicates",
        action="store_true",
        help="report duplicates across lists (leakage) as warnings, not problems",
    )
    dup.add_argument("--duplicates-report", default=None, help="write every duplicate pair to this .tsv file")
    p.set_defaults(handler=check_data_command)
    return p


def _datalist_keys(path: str, key: str) -> list[str]:
    """The lists ``--key`` names: one, several (comma-separated), or ``all`` (every list of a JSON datalist)."""
    if key != "all":
        return [k.strip() for k in key.split(",") if k.strip()] or ["training"]
    if path.lower().endswith(".csv"):
        try:
            return csv_lists(path)
        except DataError:
            return ["training"]  # load_datalist names the problem
    try:
        content = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return ["training"]  # load_datalist names the problem
    lists = [k for k, v in content.items() if isinstance(v, list)] if isinstance(content, dict) else []
    return lists or ["training"]


def _print_duplicates(args: argparse.Namespace, lists: dict[str, list[dict]], names: Sequence[str] | None) -> int:
    """Find duplicate images in and across ``lists``; print them and return the number of leakage problems."""
    report = find_duplicates(lists, args.duplicate_distance, class_names=names)
    if args.duplicates_report:
        report.write_tsv(args.duplicates_report)
        print(f"Duplicate pairs written to {args.duplicates_report}")
    for index, reason in report.hashes.errors.items():
        print(f"WARNING: {report.hashes.paths[index]}: not hashed for duplicates ({reason})")
    if not report.groups:
        return 0
    root = report.root() or os.path.dirname(os.path.abspath(args.datalist))
    print(f"{report.summary()}; paths relative to {root}")
    for line in report.warnings(root):
        print(f"WARNING: {line}")
    leakage = report.leakage_lines(root)
    if args.allow_duplicates:
        for line in leakage:
            print(f"WARNING: {line}")
        return 0
    if leakage:
        print(
            f"Leakage: {len(leakage)} pair(s) of duplicate images in different lists (a score on the later list "
            "would be optimistic). Remove one image of each pair or move the group into one list (python -m medkd "
            "prepare keeps groups together), or pass --allow-duplicates:"
        )
        print("\n".join(f"  {line}" for line in leakage))
    return len(leakage)


def _check_list(datalist: str, key: str, base_dir: str | None, class_names: Sequence[str] | None) -> list[dict]:
    """The ``key`` list of ``datalist`` (:func:`load_datalist`); the training cases of an nnU-Net v2 raw dataset,
    whose ``dataset.json`` lists none (:func:`~medkd.data.held_out.nnunet_training`)."""
    if key == "training" and (content := nnunet_raw(datalist)) is not None:
        return nnunet_training(Path(datalist).parent, content)
    return load_datalist(datalist, key=key, base_dir=base_dir, class_names=class_names)


def check_data_command(args: argparse.Namespace) -> int:
    """Run ``check-data``: print every problem and return 1, or print ``OK: N items checked`` and return 0.

    With several lists (``--key all``) each list is checked and reported on its own (``[key] OK: ...``), and
    duplicate images across lists are problems (leakage) unless ``--allow-duplicates``.
    """
    keys = _datalist_keys(args.datalist, args.key)
    lists: dict[str, list[dict]] = {}
    failed = False
    given = args.class_names.split(",") if args.class_names else None
    for key in keys:
        try:
            lists[key] = _check_list(args.datalist, key, args.base_dir, given)
        except DataError as e:
            print(f"ERROR: {e}" if len(keys) == 1 else f"ERROR: [{key}] {e}")
            failed = True
    if not lists:
        return 1
    everything = [item for items in lists.values() for item in items]
    task = args.task
    if task is None:
        task = infer_task(everything)
        if task == "classification":
            print("Task: classification (every label is a class index or name; pass --task to override)")
    names, values = given, None
    if names is None:
        names, values = optional_class_names(args.datalist), optional_label_values(args.datalist)
        if names is not None and args.num_classes is not None and len(names) != args.num_classes:
            names = values = None
    for key, items in lists.items():
        prefix = f"[{key}] " if len(keys) > 1 else ""
        problems = check_datalist(items, args.num_classes, task, names, source=args.datalist, label_values=values)
        where = f"{args.datalist} ['{key}']"
        problems = accept_missing_classes(
            problems, args.allow_missing_classes, where, task, warn=lambda message: print(f"WARNING: {message}")
        )
        if problems:
            print(prefix + format_problems(problems, args.datalist, cli_hint=False))
            failed = True
        else:
            print(f"{prefix}OK: {len(items)} items checked")
    if not args.no_duplicates and _print_duplicates(args, lists, names):
        failed = True
    return 1 if failed else 0
