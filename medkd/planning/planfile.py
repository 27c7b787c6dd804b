"""The plan file and the bundles' entry points: make, write, read and print a plan.

A plan is a JSON file (``<dataset_dir>/medkd_plan.json`` by default) holding the planned ``settings`` (bundle keys),
the ``reasons`` for each, and the data ``fingerprint`` they come from. ``python -m medkd plan`` writes it; a bundle
run on your data reads it, or makes it when it is missing (:func:`bundle_plan`). Edit the file to change a planned
value for every stage, or override a key on the command line for one run.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import medkd
from medkd.data.checks import infer_task
from medkd.data.labels import optional_class_names, optional_label_values
from medkd.data.loading import DataError, LoadMedicalImage, drop_unit_axes, load_datalist
from medkd.data.synthetic import is_default_data
from medkd.errors import ConfigError
from medkd.planning.fingerprint import fingerprint_dataset
from medkd.planning.plan import make_planner, validation_interval
from medkd.runtime.distributed import is_not_rank0, rank0_first
from medkd.runtime.files import write_settings
from medkd.training.run_fingerprint import datalist_digest
from medkd.validation import RENAMED, bundle_hint

__all__ = [
    "PLAN_FILE",
    "BundlePlan",
    "make_plan",
    "read_plan",
    "load_or_make",
    "bundle_plan",
    "show_plan",
    "summary",
    "lateral_flips",
    "lateral_rot90",
    "auto_plan",
    "current_keys",
    "data_file",
    "writable",
]

PLAN_FILE = "medkd_plan.json"
PLAN_VERSION = 1
logger = logging.getLogger("medkd.planning")
PathLike = str | os.PathLike


class BundlePlan(dict):
    """The settings a bundle uses (a plain dict of bundle keys), with where they come from (``source``), whether
    they were planned from the data (``planned``) and the ``reasons``."""

    def __init__(self, settings: Mapping[str, Any], source: str, planned: bool, reasons: Mapping[str, str] = ()):
        super().__init__(settings)
        self.source = source
        self.planned = planned
        self.reasons = dict(reasons)


def _lists(
    datalist: PathLike | Mapping[str, PathLike],
    base_dir: PathLike | None,
    keys: Sequence[str] = ("training", "validation"),
) -> dict[str, list[dict]]:
    """The entries of the ``keys`` lists: one JSON datalist holding them, or a file per list (a CSV file is read
    once, whatever the list)."""
    files = {k: datalist[k] for k in keys if k in datalist} if isinstance(datalist, Mapping) else dict.fromkeys(
        keys, datalist)  # fmt: skip
    lists, seen = {}, set()
    for key, file in files.items():
        path = Path(file).expanduser().resolve()
        is_csv = path.suffix.lower() == ".csv"
        if is_csv and path in seen:
            continue
        seen.add(path)
        try:
            lists[key] = load_datalist(path, key=key, base_dir=base_dir)
        except DataError:
            if key == "training":
                raise
            continue  # no validation list: plan from the training list
    return lists


def _json_field(datalist: PathLike | Mapping[str, PathLike], field: str) -> Any:
    path = datalist.get("training") if isinstance(datalist, Mapping) else datalist
    if path is None or not str(path).lower().endswith(".json"):
        return None
    try:
        return json.loads(Path(path).read_text()).get(field)
    except (OSError, ValueError, AttributeError):
        return None


def _modality(datalist: PathLike | Mapping[str, PathLike]) -> list[str] | None:
    modality = _json_field(datalist, "modality") or _json_field(datalist, "channel_names")  # nnU-Net v2's name
    if isinstance(modality, Mapping):
        try:
            return [str(modality[str(i)]) for i in range(len(modality))]
        except KeyError:
            return None
    return [modality] if isinstance(modality, str) else None


def make_plan(
    datalist: PathLike | Mapping[str, PathLike],
    task: str | None = None,
    base_dir: PathLike | None = None,
    class_names: Sequence[str] | None = None,
    axcodes: str | None = "auto",
    spatial_dims: int | None = None,
    device: Any = "cpu",
    max_cases: int | None = 500,
    voxel_budget: int | None = None,
    total_iterations: int | None = None,
    samples_per_volume: int | None = None,
    lateral: bool | None = None,
) -> dict[str, Any]:
    """Fingerprint the training and validation lists of ``datalist`` and plan the bundle settings.

    Args:
        datalist: a JSON datalist (or CSV), or a file per list (``{"training": ..., "validation": ...}``).
        task: ``"segmentation"`` or ``"classification"``; default: classification when every label is an integer.
        base_dir: folder relative paths start from (default: the datalist's).
        class_names: class names by index; default: the datalist's ``labels`` map, whose keys are then the classes'
            values in the label maps (:mod:`medkd.data.labels`).
        axcodes: orientation to measure positions in (the bundle's ``axcodes``); ``"auto"``: ``RA`` in 2D, ``RAS``
            in 3D for segmentation, none for classification (its bundle does not reorient).
        spatial_dims: the bundle's; data of another dimensionality raise :class:`ConfigError`.
        device: training device, picks the budget (the planner's ``budgets``, :mod:`medkd.planning.plan`).
        max_cases: read at most this many cases (evenly spread).
        voxel_budget, total_iterations, samples_per_volume, lateral: see :func:`medkd.planning.plan.make_settings`.
    """
    lists = _lists(datalist, base_dir)
    task = task or infer_task(lists.get("training", []))
    if task not in ("segmentation", "classification"):
        raise ConfigError(f"task {task!r} must be 'segmentation' or 'classification'.")
    names = list(class_names) if class_names else optional_class_names(datalist)
    dims = spatial_dims or (_first_image_dims(lists) if task == "segmentation" else None)
    if axcodes == "auto":
        axcodes = None if task == "classification" else "RAS" if dims == 3 else "RA"
    fingerprint = fingerprint_dataset(
        lists,
        task=task,
        class_names=names,
        axcodes=axcodes,
        modality=_modality(datalist),
        max_cases=max_cases,
        label_values=None if class_names else optional_label_values(datalist),
        spatial_dims=dims,
    )
    _check_dims(fingerprint, spatial_dims, datalist, task)
    planner = make_planner(
        fingerprint, task, device, voxel_budget, total_iterations, samples_per_volume=samples_per_volume,
        lateral=lateral,
    )  # fmt: skip
    settings, reasons = planner.plan()
    return {
        "medkd_plan": PLAN_VERSION,
        "medkd_version": medkd.__version__,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "task": task,
        "spatial_dims": fingerprint["spatial_dims"],
        "device": planner.device,
        "budget": planner.budget,
        "data": datalist_digest(datalist, keys=tuple(lists)),
        "settings": settings,
        "reasons": reasons,
        "fingerprint": fingerprint,
    }


def _first_image_dims(lists: Mapping[str, Sequence[Mapping[str, Any]]]) -> int:
    """The spatial dimensions of the first training image; one slice stored as (H, W, 1) is 2D."""
    first = LoadMedicalImage(ensure_channel_first=True, dtype=None)(lists["training"][0]["image"])
    return drop_unit_axes(first, 2).ndim - 1


def _check_dims(
    fingerprint: Mapping[str, Any],
    spatial_dims: int | None,
    datalist: PathLike | Mapping[str, PathLike],
    task: str,
) -> None:
    """Raise :class:`ConfigError` when the data are not of the bundle's ``spatial_dims``."""
    dims = fingerprint["spatial_dims"]
    if spatial_dims and dims != int(spatial_dims):
        training = datalist.get("training") if isinstance(datalist, Mapping) else datalist
        raise ConfigError(
            f"the images of {training} are {dims}D but this bundle has spatial_dims={spatial_dims}: "
            f"{bundle_hint(dims, task)}, or convert the data."
        )


def writable(folder: PathLike) -> bool:
    """Whether medkd may write files into ``folder``: it is missing (made when written to), or writable."""
    return not os.path.isdir(folder) or os.access(folder, os.W_OK)


def data_file(dataset_dir: PathLike, name: str, bundle_root: PathLike) -> str:
    """Where a bundle keeps a file it makes from the data once (its ``plan_file``, ``split_file``):
    ``<dataset_dir>/<name>``, or, when that folder is read-only and holds no such file, ``<bundle_root>/<name>``,
    beside the run's outputs (``models``, ``eval``), where the next run reads it; that case is logged."""
    dataset_dir = os.path.expanduser(dataset_dir)
    in_data = os.path.join(dataset_dir, name)
    if os.path.isfile(in_data) or writable(dataset_dir):
        return in_data
    beside = os.path.join(os.path.expanduser(bundle_root), name)
    if not is_not_rank0():
        logger.info("%s is read-only: %s is read from and written to %s", dataset_dir, name, beside)
    return beside


def read_plan(path: PathLike) -> dict[str, Any]:
    """Read a plan file, or raise :class:`ConfigError` naming it and the fix."""
    path = Path(path).expanduser()
    fix = f"fix it, or delete it (or run `python -m medkd plan --dataset-dir {path.parent}`) to plan again."
    try:
        plan = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"the plan file {path} is not valid JSON ({e}): {fix}") from e
    except OSError as e:
        raise ConfigError(f"cannot read the plan file {path} ({e}).") from e
    if not isinstance(plan, dict) or not isinstance(plan.get("settings"), dict):
        raise ConfigError(f"the plan file {path} has no 'settings' object: {fix}")
    return plan


def load_or_make(
    plan_file: PathLike,
    datalist: PathLike | Mapping[str, PathLike],
    task: str | None = None,
    spatial_dims: int | None = None,
    remake: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """The plan in ``plan_file``, or a new one made from ``datalist`` and written there (see :func:`make_plan` for
    ``options``).

    An existing file is used as it is (it may have been edited); it must be of the same task and dimensionality
    (else :class:`ConfigError`). A plan made from another version of the data lists is used too, with a warning
    saying how to plan again. In a ``torchrun`` run, rank 0 plans and the other processes read its file.
    """
    with rank0_first():
        return _load_or_make(Path(plan_file).expanduser(), datalist, task, spatial_dims, remake, **options)


def _load_or_make(
    path: Path,
    datalist: PathLike | Mapping[str, PathLike],
    task: str | None,
    spatial_dims: int | None,
    remake: bool,
    **options: Any,
) -> dict[str, Any]:
    if path.is_file() and not remake:
        plan = read_plan(path)
        if task and plan.get("task", task) != task:
            raise ConfigError(
                f"the plan file {path} is a {plan.get('task')} plan, but this is a {task} bundle: pass --plan_file "
                f"another path, or delete {path.name} to plan again."
            )
        if spatial_dims and int(plan.get("spatial_dims", spatial_dims)) != int(spatial_dims):
            raise ConfigError(
                f"the plan file {path} is for {plan.get('spatial_dims')}D images, but this bundle has spatial_dims="
                f"{spatial_dims}: pass --plan_file another path, or delete {path.name} to plan again."
            )
        _warn_if_data_changed(plan, path, datalist)
        return plan
    plan = make_plan(datalist, task=task, spatial_dims=spatial_dims, **options)
    write_settings(plan, path)
    logger.info("plan written to %s", path)
    return plan


def _warn_if_data_changed(plan: Mapping[str, Any], path: Path, datalist: Any) -> None:
    recorded = plan.get("data")
    if not isinstance(recorded, Mapping):
        return
    now = datalist_digest(datalist, keys=tuple(recorded))
    changed = [k for k in recorded if now.get(k, {}).get("sha256") != recorded[k].get("sha256")]
    if changed:
        logger.warning(
            "the plan %s was made from other data lists (%s changed since); it is used as it is. To plan again, run "
            "`python -m medkd plan --dataset-dir %s` (or delete the file).",
            path,
            ", ".join(changed),
            path.parent,
        )


def bundle_plan(
    plan_file: PathLike,
    datalist: PathLike | Mapping[str, PathLike],
    default: Mapping[str, Any],
    use: bool = True,
    task: str | None = None,
    spatial_dims: int | None = None,
    **options: Any,
) -> BundlePlan:
    """The settings a bundle reads its planned keys from (``"patch_size": "$@plan['patch_size']"``).

    Args:
        plan_file: the plan file (made from ``datalist`` when missing, see :func:`load_or_make`).
        datalist: the bundle's datalist file, or its file per list.
        default: the bundle's ``default_plan``: the values used when ``use`` is false, and for any key the plan file
            lacks.
        use: plan from the data (the bundles' ``auto_plan``: true for your data, false for the embedded synthetic
            data, whose settings stay the bundle's defaults).
        task, spatial_dims, options: see :func:`load_or_make` and :func:`make_plan`.
    """
    if not use:
        return BundlePlan(default, source="the bundle's default_plan (auto_plan false)", planned=False)
    plan = load_or_make(plan_file, datalist, task=task, spatial_dims=spatial_dims, **options)
    settings = current_keys(plan["settings"])
    missing = [k for k in default if k not in settings]
    if missing:
        logger.warning("the plan %s has no %s: the bundle's defaults are used for them", plan_file, missing)
        settings.update({k: default[k] for k in missing})
    return BundlePlan(
        settings, source=f"{Path(plan_file).expanduser()} (made for {plan.get('device', '?')})", planned=True,
        reasons=plan.get("reasons", {}),
    )  # fmt: skip


def current_keys(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` with the keys of earlier medkd versions (:data:`medkd.validation.RENAMED`, e.g. a plan file's
    ``image_size``) under their current name; a current key wins over its old name."""
    old = {RENAMED[k]: v for k, v in settings.items() if k in RENAMED}
    return {**old, **{k: v for k, v in settings.items() if k not in RENAMED}}


def _fmt(value: Any) -> str:
    return json.dumps(value, default=str) if not isinstance(value, str) else value


def show_plan(
    plan: Mapping[str, Any], used: Mapping[str, Any], networks: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Log the settings a run uses (rank 0): each planned key's value, marked where an override replaced the plan's,
    and each network's parameter count.

    Returns:
        the same as a record (``source``, ``planned``, ``settings``, ``differs_from_plan`` with the planned value and
        why, ``parameters``, the plan's ``reasons``), which the bundles keep beside the checkpoints
        (:class:`~medkd.training.handlers.ResumeCheckpoint`'s ``settings``).
    """
    source = getattr(plan, "source", "plan")
    lines = [f"settings from {source}; a --KEY override wins:"]
    width = max((len(k) for k in used), default=0)
    changed = {}
    for key, value in used.items():
        line = f"  {key:<{width}}  {_fmt(value)}"
        if key in plan and not _same(plan[key], value):
            why = "override"
            if key == "val_interval" and value == validation_interval(plan, used.get("max_epochs", 0)):
                why = "follows max_epochs"
            elif key in LATERAL and used.get("lateral") and _same(value, LATERAL[key](plan[key], True)):
                why = "follows lateral"
            line += f"   ({why}; planned {_fmt(plan[key])})"
            changed[key] = {"planned": plan[key], "why": why}
        lines.append(line)
    counts = {n: sum(p.numel() for p in net.parameters()) for n, net in (networks or {}).items()}
    if counts:
        lines.append("  parameters: " + ", ".join(f"{n} {c:,}" for n, c in counts.items()))
    if not is_not_rank0():
        logger.info("\n".join(lines))
    return {
        "source": source,
        "planned": getattr(plan, "planned", None),
        "settings": dict(used),
        "differs_from_plan": changed,
        "parameters": counts,
        "reasons": getattr(plan, "reasons", {}),
    }


def _same(a: Any, b: Any) -> bool:
    try:
        return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str) or (
            isinstance(a, list | tuple) and isinstance(b, list | tuple) and list(a) == list(b)
        )
    except (TypeError, ValueError):
        return a == b


def lateral_flips(flip_axes: Sequence[int] | None, lateral: bool, axis: int = 0) -> list[int]:
    """``flip_axes`` without the left-right ``axis`` when the findings are ``lateral`` (classification bundle)."""
    return [int(a) for a in (flip_axes or []) if not (lateral and int(a) == axis)]


def lateral_rot90(rot90_axes: Sequence[int] | None, lateral: bool) -> list[int] | None:
    """``rot90_axes``, or none when the findings are ``lateral``: a 90° rotation moves a left finding up or right
    (classification bundle)."""
    return None if lateral or not rot90_axes else [int(a) for a in rot90_axes]


# the augmentation keys that a classification bundle's ``lateral`` changes, by the function that changes them
LATERAL = {"flip_axes": lateral_flips, "rot90_axes": lateral_rot90}


def auto_plan(dataset_dir: PathLike, bundle_root: PathLike) -> bool:
    """Whether a bundle plans its settings from the data (its ``auto_plan``): for any ``dataset_dir`` but the
    bundle's embedded synthetic data, which keeps the bundle's ``default_plan``."""
    return not is_default_data(str(dataset_dir), str(bundle_root))


def summary(plan: Mapping[str, Any], path: PathLike | None = None) -> str:
    """A human-readable summary of a plan: what was measured, what was decided and why."""
    fp = plan["fingerprint"]
    dims = fp["spatial_dims"]
    x = "x".join
    lines = [
        f"Plan{f' ({path})' if path else ''}: {plan['task']}, {dims}D, {fp['cases']} cases read "
        f"({', '.join(f'{k} {v}' for k, v in fp['lists'].items())}), for {plan['device']} "
        f"(budget {plan['budget']['voxels']} voxels per batch, about {plan['budget']['iterations']} iterations)",
        "Measured:",
        f"  channels      {fp['in_channels']} (images per channel count: {fp['channels_seen']})",
        f"  spacing       median {fp['spacing']['median']}, min {fp['spacing']['min']}, max {fp['spacing']['max']}",
        f"  size          median {x(map(_num, fp['size']['median']))}, min {x(map(_num, fp['size']['min']))}, "
        f"max {x(map(_num, fp['size']['max']))}",
    ]
    for ch in fp["intensity"]:
        lines.append(
            f"  intensity {ch['channel']}   {ch['over']}: 0.5-99.5% "
            f"[{ch['percentile_00_5']:g}, {ch['percentile_99_5']:g}], "
            f"mean {ch['mean']:g}, std {ch['std']:g}, image min {ch['image_min']:g}"
            + (", integer" if ch["integer"] else "")
            + (", CT-like" if ch["ct_like"] else "")
        )
    for c in fp["classes"]:
        if plan["task"] == "segmentation":
            extent = c.get("median_extent")
            lines.append(
                f"  class {c['index']} {c['name']}"
                + (f" (value {c['value']})" if c.get("value", c["index"]) != c["index"] else "")
                + f": {100 * c['voxel_fraction']:.3g}% of voxels, in {c['images']} images"
                + (f", median object extent {' x '.join(map(_num, extent))}" if extent else "")
            )
        else:
            share = f"{100 * c['sample_fraction']:.3g}%"
            lines.append(f"  class {c['index']} {c['name']}: {c['samples']} samples ({share})")
    if fp["lateral"]:
        for e in fp["lateral"]:
            found = " and ".join(e["found_by"])
            lines.append(f"  lateral       {' / '.join(e['names'])}: axis {e['axis']}, by {found}")
    else:
        lines.append("  lateral       none")
    for w in fp.get("warnings", []):
        lines.append(f"  WARNING: {w}")
    lines.append("Decided (bundle keys; override any with --KEY VALUE, or edit the plan file):")
    width = max(len(k) for k in plan["settings"])
    for key, value in plan["settings"].items():
        lines.append(f"  {key:<{width}}  {_fmt(value)}")
    lines.append("Why:")
    for key, reason in plan.get("reasons", {}).items():
        lines.append(f"  {key}: {reason}")
    return "\n".join(lines)


def _num(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)
