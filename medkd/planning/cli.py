"""``python -m medkd plan``: fingerprint a dataset, plan the bundle settings, write the plan file, print a summary."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from medkd.data.checks import infer_task
from medkd.data.held_out import SPLIT_FILE, bundle_datalists, lists_to_hold_out, nnunet_raw
from medkd.data.loading import load_datalist
from medkd.planning.planfile import PLAN_FILE, data_file, make_plan, summary
from medkd.runtime.files import write_settings
from medkd.training.previous import set_aside

__all__ = ["add_plan_parser", "plan_command"]


def plan_command(args: argparse.Namespace) -> int:
    """Run ``plan``: write ``<dataset_dir>/medkd_plan.json`` (or ``--output``; the current folder for a read-only
    dataset folder) and print its summary."""
    dataset_dir = Path(args.dataset_dir).expanduser()
    datalist = Path(args.datalist).expanduser() if args.datalist else dataset_dir / "dataset.json"
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    beside = Path(args.output).expanduser().parent if args.output else Path.cwd()
    plan = make_plan(
        _datalists(datalist, dataset_dir, args.task, Path(data_file(dataset_dir, SPLIT_FILE, beside))),
        task=args.task,
        base_dir=args.base_dir or (str(dataset_dir) if not args.datalist else None),
        class_names=args.class_names.split(",") if args.class_names else None,
        axcodes=args.axcodes,
        device=device,
        max_cases=args.max_cases or None,
        voxel_budget=args.voxel_budget,
        total_iterations=args.iterations,
        lateral=args.lateral,
    )
    output = Path(args.output).expanduser() if args.output else Path(data_file(dataset_dir, PLAN_FILE, beside))
    moved = set_aside([output])
    write_settings(plan, output)
    print(summary(plan, output))
    if moved:
        print(f"(the previous plan was moved aside to {moved[output]})")
    read = f"--dataset_dir {dataset_dir}" + ("" if output == dataset_dir / PLAN_FILE else f" --plan_file {output}")
    print(f"\nPlan written to {output}; the bundles read it when run with {read}.")
    return 0


def _datalists(datalist: Path, dataset_dir: Path, task: str | None, split_file: Path) -> str | dict[str, str]:
    """The datalist, or the bundles' split file (made now when missing) where it lacks validation or test lists, so
    that the plan is made from the lists the bundles read (:mod:`medkd.data.held_out`)."""
    missing = lists_to_hold_out(datalist)
    if not missing:
        return str(datalist)
    if task is None:  # an nnU-Net raw dataset lists no cases: its labels are label maps
        task = "segmentation" if nnunet_raw(datalist) is not None else infer_task(load_datalist(datalist))
    datalists = bundle_datalists(datalist, split_file, task=task)
    print(f"{datalist} lacks {' and '.join(missing)}: the lists are in {datalists['training']}")
    return datalists


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_plan_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``python -m medkd plan``."""
    p = subparsers.add_parser(
        "plan",
        help="measure a dataset and plan the bundle settings (spacing, patch, batch, network, augmentation)",
        description="Fingerprint the training and validation lists of a datalist (spacing, sizes, intensities, "
        "classes, lateral classes), decide the bundle settings from it and write them with their reasons to "
        f"<dataset-dir>/{PLAN_FILE}. See docs/planning.md.",
    )
    p.add_argument("--dataset-dir", required=True, help="the data folder (the bundles' --dataset_dir)")
    p.add_argument("--datalist", default=None, help="datalist file (default: <dataset-dir>/dataset.json)")
    p.add_argument("--task", choices=("segmentation", "classification"), default=None,
                   help="default: classification when every label is an integer class index")  # fmt: skip
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="the training device, which sets the budget (default: cuda when available)")  # fmt: skip
    p.add_argument("--output", default=None,
                   help=f"plan file (default: <dataset-dir>/{PLAN_FILE}, ./{PLAN_FILE} if read-only)")  # fmt: skip
    p.add_argument("--base-dir", default=None, help="folder relative paths start from (default: the datalist's)")
    p.add_argument("--class-names", default=None, help="comma-separated class names (default: the labels map)")
    p.add_argument("--axcodes", default="auto", help="orientation of the bundle (default: RA in 2D, RAS in 3D)")
    p.add_argument("--max-cases", type=int, default=500, help="read at most this many cases (0: all; default 500)")
    p.add_argument("--voxel-budget", type=int, default=None, help="voxels of one training batch (default: by device)")
    p.add_argument("--iterations", type=int, default=None, help="training iterations per stage (default: by device)")
    p.add_argument(
        "--lateral",
        type=_bool,
        default=None,
        help="classification: lateralised findings, no left-right flips (default: from class names)",
    )
    p.set_defaults(handler=plan_command)
    return p
