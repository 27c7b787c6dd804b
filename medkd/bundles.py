"""Locate the config files of a bundle's stages, including bundles that overlay another bundle's configs."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser

__all__ = ["STAGES", "stage_files", "stage_config"]

STAGES = ("train_teacher", "train", "evaluate", "inference", "multi_gpu_train")


def stage_files(bundle_dir: str | Path, stage: str) -> list[Path]:
    """The config files to merge, in order, to run ``stage`` of the bundle in ``bundle_dir``.

    ``train.json`` is the base of every stage (model-zoo convention: ``evaluate.json`` etc. merge after it). A
    bundle whose ``train.json`` names ``"base_configs"`` (a folder, relative to the bundle) is an overlay: the base
    folder's ``train.json`` comes first, then the bundle's, then the stage file from the bundle if it has one,
    else from the base. A bundle whose ``train.json`` names ``"shared_configs"`` takes the stage files it lacks from
    that folder (e.g. the classification bundle uses the segmentation bundle's ``train_teacher.json`` and
    ``multi_gpu_train.json``, which hold nothing task-specific) without merging its ``train.json``.
    """
    configs = Path(bundle_dir) / "configs"
    train = configs / "train.json"
    if not train.is_file():
        raise FileNotFoundError(f"{train} does not exist: {bundle_dir} is not a medkd bundle folder.")
    settings = json.loads(train.read_text())
    base, shared = ((Path(bundle_dir) / settings[k]).resolve() if settings.get(k) else None
                    for k in ("base_configs", "shared_configs"))  # fmt: skip
    files = ([base / "train.json"] if base else []) + [train]
    if stage == "train":
        return files
    folders = [folder for folder in (configs, base, shared) if folder is not None]
    for folder in folders:
        if (folder / f"{stage}.json").is_file():
            return files + [folder / f"{stage}.json"]
    raise FileNotFoundError(f"bundle {bundle_dir} has no {stage}.json in {', '.join(str(f) for f in folders)}")


def stage_config(bundle_dir: str | Path, stage: str, overrides: Mapping[str, Any] | None = None) -> ConfigParser:
    """The merged config of ``stage`` (see :func:`stage_files`) with ``bundle_root`` set to the bundle and
    ``overrides`` applied, as ``python -m monai.bundle run`` would see it; nothing is parsed yet."""
    parser = ConfigParser()
    parser.read_config([str(p) for p in stage_files(bundle_dir, stage)])
    parser["bundle_root"] = str(bundle_dir)
    for key, value in (overrides or {}).items():
        parser[key] = value
    return parser
