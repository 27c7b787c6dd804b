"""The segmentation bundles' training settings, read from their configs, for the benchmarks to build the same
networks, loss and batches as the bundles do."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from medkd.bundles import stage_config
from medkd.data.synthetic import SEGMENTATION_CLASSES
from medkd.training.allocator import keep_freed_memory

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"


def add_allocator_option(parser: argparse.ArgumentParser) -> None:
    """``--default-allocator``: measure with glibc's default malloc policy, not the bundles' (``keep_freed_memory``)."""
    parser.add_argument(
        "--default-allocator",
        action="store_true",
        help="leave glibc's malloc at its default policy (the bundles' --keep_freed_memory False)",
    )


def use_allocator(args: argparse.Namespace) -> bool:
    """Keep freed memory as the bundles do (``keep_freed_memory: true``) unless ``--default-allocator``; whether it
    is kept."""
    return keep_freed_memory(not args.default_allocator)


def bundle_setting(bundle: str, **overrides) -> dict:
    """A parser of ``bundles/<bundle>``'s distillation config (with ``overrides``) and its batch geometry and
    learning rate.

    The classes are those of the synthetic data (3), so no datalist is read. ``batch_size`` counts patches:
    the bundle's batch size times ``samples_per_volume`` where it samples several patches per volume.
    """
    parser = stage_config(BUNDLES / bundle, "train", {"class_names": list(SEGMENTATION_CLASSES), **overrides})
    per_volume = parser.get_parsed_content("samples_per_volume") if "samples_per_volume" in parser else 1
    return dict(
        parser=parser,
        spatial_dims=parser.get_parsed_content("spatial_dims"),
        in_channels=parser.get_parsed_content("in_channels"),
        num_classes=parser.get_parsed_content("num_classes"),
        batch_size=parser.get_parsed_content("batch_size") * per_volume,
        size=list(parser.get_parsed_content("patch_size")),
        lr=parser.get_parsed_content("learning_rate"),
        teacher=tuple(parser.get_parsed_content("teacher_def#channels")),
        student=tuple(parser.get_parsed_content("student_def#channels")),
    )


def make_network(cfg: dict, role: str, seed: int) -> torch.nn.Module:
    """A fresh ``teacher_def`` / ``student_def`` of the bundle, initialised from ``seed``."""
    torch.manual_seed(seed)
    return cfg["parser"].get_parsed_content(f"{role}_def", lazy=False)


def make_loss(cfg: dict) -> torch.nn.Module:
    """A fresh instance of the bundle's supervised ``loss``."""
    return cfg["parser"].get_parsed_content("loss", lazy=False)
