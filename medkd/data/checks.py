"""Input checks run before training and evaluation (the ``check-data`` command is :mod:`medkd.data.check_data`).

* :func:`check_datalist` returns every problem of a datalist at once (missing or corrupt files, NaN/Inf pixels,
  image/label mismatch, out-of-range labels, classes without samples).
* :func:`assert_valid_datalist` raises one :class:`~medkd.errors.DataError` listing them all; call it from a
  bundle's ``initialize`` list so a bad dataset stops the run before any DataLoader worker starts.
* :func:`check_before_run` checks a bundle's lists, also for images shared between lists (leakage).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data.utils import affine_to_spacing
from monai.transforms import Orientation
from monai.utils import ensure_tuple

from medkd.data.datalists import load_datalist
from medkd.data.finite import count_nonfinite
from medkd.data.labels import check_label_values
from medkd.data.loading import ORIENTATION_LABELS, LoadMedicalImage
from medkd.errors import DataError
from medkd.runtime.distributed import is_not_rank0

__all__ = [
    "Problem",
    "accept_missing_classes",
    "assert_valid_datalist",
    "check_before_run",
    "check_datalist",
    "error_reason",
    "format_problems",
    "infer_task",
]

logger = logging.getLogger(__name__)

TASKS = ("segmentation", "classification")
DATASET = "<datalist>"
MISSING_CLASS = "missing_class"
OUTSIDE_VALUES = "outside_values"  # label values that are no class's: a class they hide is not missing from the data


@dataclass(frozen=True)
class Problem:
    """One problem found in a datalist: the file (or entry) concerned and what is wrong with it.

    ``kind`` tags problems that a setting can accept (``"missing_class"``: a class without samples) or that explain
    others (``"outside_values"``: label values that are no class's); it is not compared.
    """

    path: str
    reason: str
    kind: str = field(default="", compare=False)

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def error_reason(error: BaseException) -> str:
    """Most useful one-line message of an exception chain: the first DataError, else the innermost error."""
    chain = [error]
    while chain[-1].__cause__ is not None and len(chain) < 20:
        chain.append(chain[-1].__cause__)
    best = next((e for e in chain if isinstance(e, DataError)), chain[-1])
    text = str(best) if isinstance(best, DataError) else f"{type(best).__name__}: {best}"
    return " ".join(text.split())


def _load(loader: LoadMedicalImage, paths: Any, problems: list[Problem]) -> Any:
    """Load an image, or append a Problem (per missing file, else one for the unreadable image) and return None."""
    names = [str(p) for p in ensure_tuple(paths)]
    missing = [p for p in names if not os.path.exists(p)]
    for p in missing:
        problems.append(Problem(p, "file not found (check the path; relative paths start at the datalist's folder)"))
    if missing:
        return None
    try:
        return loader(paths)
    except DataError as e:
        cause = e.__cause__
        reason = f"unreadable or corrupt file ({error_reason(cause)})" if cause is not None else str(e)
        problems.append(Problem(names[0] if len(names) == 1 else str(names), reason))
        return None


def _geometry_problem(image: Any, label: Any, image_path: str) -> str | None:
    """What differs between the grids of ``image`` and ``label`` (shape, spacing, origin, orientation), or ``None``.
    A label stored in another orientation of the same grid (LPS beside RAS) is the same grid: the bundles reorient
    both."""
    shape_i = tuple(int(s) for s in image.meta["spatial_shape"])
    shape_l = tuple(int(s) for s in label.meta["spatial_shape"])
    aff_i, aff_l = np.asarray(image.affine, dtype=float), np.asarray(label.affine, dtype=float)
    problem = _grid_problem(shape_i, aff_i, shape_l, aff_l, image_path)
    if problem is None or aff_i.shape != aff_l.shape or len(shape_l) != label.ndim:
        return problem
    try:
        codes = "".join(nib.orientations.aff2axcodes(aff_i))[: len(shape_i)]
        turned = Orientation(axcodes=codes, labels=ORIENTATION_LABELS)(label[None])
    except (ValueError, RuntimeError, IndexError):
        return problem
    same = _grid_problem(shape_i, aff_i, tuple(turned.shape[1:]), np.asarray(turned.affine, dtype=float), image_path)
    return problem if same else None


def _grid_problem(
    shape_i: tuple[int, ...], aff_i: np.ndarray, shape_l: tuple[int, ...], aff_l: np.ndarray, image_path: str
) -> str | None:
    if shape_i != shape_l:
        return f"label shape {list(shape_l)} differs from image shape {list(shape_i)} ({image_path})"
    if aff_i.shape != aff_l.shape:
        return f"label affine is {aff_l.shape[0] - 1}D but image affine is {aff_i.shape[0] - 1}D ({image_path})"
    sp_i, sp_l = affine_to_spacing(aff_i, r=len(shape_i)), affine_to_spacing(aff_l, r=len(shape_l))
    if not np.allclose(sp_i, sp_l, rtol=1e-3, atol=1e-3):
        return (
            f"label spacing {np.round(sp_l, 4).tolist()} differs from image spacing {np.round(sp_i, 4).tolist()} "
            f"({image_path}); resample the label onto the image grid (nearest neighbour)"
        )
    if not np.allclose(aff_i, aff_l, rtol=1e-3, atol=1e-3):
        shift = float(np.abs(aff_i - aff_l).max())
        return (
            f"label origin/orientation differ from the image ({image_path}; largest affine difference {shift:.4g}); "
            "the label was probably saved from another image"
        )
    return None


def _label_values(label: Any) -> np.ndarray:
    array = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
    values = np.unique(array)
    return values[np.isfinite(values)] if np.issubdtype(values.dtype, np.inexact) else values


def _nonfinite_problem(array: Any, path: str, what: str = "image") -> Problem | None:
    count = count_nonfinite(array)
    if not count:
        return None
    return Problem(
        path,
        f"{count} non-finite {what} value(s) (NaN or Inf) out of {int(np.prod(array.shape))}; replace them with a "
        "number (e.g. numpy.nan_to_num) and save the file again, or remove it from the datalist",
    )


def _outside_problem(bad: Sequence[int], label_values: Sequence[int] | None, num_classes: int) -> str:
    if label_values is not None and list(label_values) != list(range(num_classes)):
        return (
            f"label values {bad[:10]} are not among the classes' values {list(label_values)} (the datalist's "
            "'labels' map or --label_values); add a class for each, or fix the label map"
        )
    hint = (
        "; a 0/255 mask: divide it by 255, or give each class's value in the datalist's 'labels' map "
        '({"0": "background", "255": "lesion"}; a CSV datalist has none: --label_values "[0, 255]")'
        if 255 in bad
        else "; if the label maps use other values for the classes, give each class's value as the key of the "
        'datalist\'s \'labels\' map (BraTS: {"0": "background", "1": ..., "2": ..., "4": ...}; a CSV datalist '
        'has none: --label_values "[0, 1, 2, 4]")'
    )
    return f"label values {bad[:10]} outside 0..{num_classes - 1}{hint}"


def _class_name(index: int, class_names: Sequence[str] | None) -> str:
    return f"class {index} ('{class_names[index]}')" if class_names and index < len(class_names) else f"class {index}"


def check_datalist(
    items: Sequence[Mapping[str, Any]],
    num_classes: int | None = None,
    task: str = "segmentation",
    class_names: Sequence[str] | None = None,
    image_key: str = "image",
    label_key: str = "label",
    source: str = DATASET,
    label_values: Sequence[int] | None = None,
) -> list[Problem]:
    """Check a datalist and return every problem found (an empty list means the data is usable).

    Reports: an empty dataset, entries without image, missing and unreadable files, images (and label maps) with
    NaN/Inf values, and when labels are present:
    segmentation label maps whose shape or geometry (spacing, origin, orientation) differ from their image,
    label values that are not integers in ``0..num_classes-1`` (voxel values for segmentation, the class index
    for classification; for segmentation, not in ``label_values`` when they are given) and classes that never occur
    in the whole dataset.

    Args:
        items: datalist entries, e.g. from :func:`medkd.data.loading.load_datalist`.
        num_classes: number of classes including background; ``None`` skips range and coverage checks
            (defaults to ``len(class_names)`` when names are given).
        task: ``"segmentation"`` (label is a path) or ``"classification"`` (label is an int).
        class_names: optional names used in the messages.
        image_key, label_key: keys of the entries.
        source: name of the datalist used for dataset-level problems.
        label_values: segmentation: the value of each class in the label maps, in class order (the datalist's
            ``labels`` map, see :mod:`medkd.data.labels`); default ``0..num_classes-1``.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}.")
    if num_classes is None and class_names:
        num_classes = len(class_names)
    problems: list[Problem] = []
    if class_names and num_classes is not None and len(class_names) != num_classes:
        problems.append(Problem(source, f"{len(class_names)} class names given for num_classes={num_classes}"))
    values_given = task == "segmentation" and num_classes is not None and label_values is not None
    label_values = check_label_values(label_values, num_classes) if values_given else None
    if not items:
        return [*problems, Problem(source, "the dataset is empty: no entries to check or train on")]
    tally = _Tally(
        LoadMedicalImage(image_only=True, dtype=None),
        task,
        num_classes,
        label_values,
        {v: c for c, v in enumerate(label_values or range(num_classes or 0))},
        problems,
    )
    has_labels = any(isinstance(it, Mapping) and label_key in it for it in items)
    for i, item in enumerate(items):
        if not isinstance(item, Mapping) or not item.get(image_key):
            problems.append(Problem(f"entry {i}", f"has no '{image_key}' field ({item!r})"))
            continue
        image = _load(tally.loader, item[image_key], problems)
        if image is not None and (bad := _nonfinite_problem(image, str(item[image_key]))):
            problems.append(bad)
        if not has_labels:
            continue
        if label_key not in item:
            problems.append(Problem(str(item[image_key]), f"has no '{label_key}' while other entries do (entry {i})"))
        elif task == "classification":
            tally.class_index(item[label_key], str(item[image_key]))
        else:
            tally.label_map(item[label_key], image, str(item[image_key]))
    if num_classes is not None and tally.labels_checked:
        where_seen = "has no sample" if task == "classification" else "never appears in any label map"
        for c in range(num_classes):
            if c not in tally.seen:
                problems.append(Problem(source, f"{_class_name(c, class_names)} {where_seen}", MISSING_CLASS))
    return problems


@dataclass
class _Tally:
    """What :func:`check_datalist` found so far: its ``problems``, the classes ``seen`` and the labels checked."""

    loader: LoadMedicalImage
    task: str
    num_classes: int | None
    label_values: Sequence[int] | None
    class_of: dict[int, int]  # the class of each label value
    problems: list[Problem]
    seen: set[int] = field(default_factory=set)
    labels_checked: int = 0

    def class_index(self, label: Any, image_path: str) -> None:
        """Check a classification label: an integer class index of ``0..num_classes-1``."""
        if isinstance(label, bool) or not isinstance(label, int | np.integer):
            self.problems.append(Problem(image_path, f"label {label!r} is not an integer class index"))
        elif self.num_classes is not None and not 0 <= label < self.num_classes:
            self.problems.append(Problem(image_path, f"label {label} outside 0..{self.num_classes - 1}"))
        else:
            self.seen.add(int(label))
            self.labels_checked += 1

    def label_map(self, label: Any, image: Any, image_path: str) -> None:
        """Check a segmentation label map: readable, finite, on the image's grid, of integer class values."""
        if not isinstance(label, str | os.PathLike | list | tuple):
            reason = f"label {label!r} is not a label-map path; for class indices use --task classification"
            self.problems.append(Problem(image_path, reason))
            return
        label_map = _load(self.loader, label, self.problems)
        if label_map is None:
            return
        label_path = str(label)
        if bad := _nonfinite_problem(label_map, label_path, "label"):
            self.problems.append(bad)
        if image is not None and (mismatch := _geometry_problem(image, label_map, image_path)):
            self.problems.append(Problem(label_path, mismatch))
        values = _label_values(label_map)
        self.labels_checked += 1
        non_int = values[values != np.round(values)]
        if non_int.size:
            self.problems.append(
                Problem(
                    label_path,
                    f"non-integer label values (e.g. {non_int[:3].tolist()}); a label map holds class indices "
                    "- was it resampled with linear interpolation?",
                )
            )
            values = np.round(values)
        if self.num_classes is None:
            return
        if bad_values := [int(v) for v in values if int(v) not in self.class_of]:
            reason = _outside_problem(bad_values, self.label_values, self.num_classes)
            self.problems.append(Problem(label_path, reason, OUTSIDE_VALUES))
        self.seen.update(self.class_of[int(v)] for v in values if int(v) in self.class_of)


def format_problems(problems: Sequence[Problem], source: str = DATASET, cli_hint: bool = True) -> str:
    """Human-readable report: a header, one problem per line, and what to do next."""
    lines = [f"Data check failed: {len(problems)} problem(s) in {source}:"]
    lines += [f"  - {p}" for p in problems]
    hint = "Fix or remove these entries and run again"
    if cli_hint:
        hint += "; `python -m medkd check-data --datalist PATH` lists the problems without starting a run"
    lines.append(hint + ".")
    return "\n".join(lines)


def assert_valid_datalist(
    datalist: Sequence[Mapping[str, Any]] | str | os.PathLike,
    num_classes: int | None = None,
    task: str = "segmentation",
    class_names: Sequence[str] | None = None,
    key: str = "training",
    base_dir: str | os.PathLike | None = None,
    image_key: str = "image",
    label_key: str = "label",
    allow_missing_classes: bool = False,
) -> list[dict]:
    """Check a datalist (entries, or a JSON/CSV path read with ``key``/``base_dir``) and return its entries.

    With ``allow_missing_classes``, a class without samples is logged as a warning instead of being a problem.

    Raises:
        DataError: listing every problem, one per line, when the data is not usable.
    """
    if isinstance(datalist, str | os.PathLike):
        source = str(datalist)
        items = load_datalist(datalist, key=key, base_dir=base_dir)
    else:
        source, items = DATASET, [dict(item) for item in datalist]
    problems = check_datalist(items, num_classes, task, class_names, image_key, label_key, source=source)
    problems = accept_missing_classes(problems, allow_missing_classes, f"{source} ['{key}']", task)
    if problems:
        raise DataError(format_problems(problems, source))
    return items


def accept_missing_classes(
    problems: Sequence[Problem], allow: bool, where: str, task: str, warn: Callable[[str], Any] | None = None
) -> list[Problem]:
    """``problems`` without the classes that have no sample when ``allow`` is set, each passed to ``warn`` (default:
    logged as a warning) with ``where`` (the datalist and key) and what accepting it means."""
    if not allow:
        return list(problems)
    note = (
        "the ROC-AUC of a class without samples is undefined, so the AUC is the mean over the classes present"
        if task == "classification"
        else "validation Dice leaves it out of the mean"
    )
    for p in problems:
        if p.kind == MISSING_CLASS:
            (warn or logger.warning)(f"{where}: {p.reason}; accepted (allow_missing_classes): {note}")
    return [p for p in problems if p.kind != MISSING_CLASS]


def check_before_run(
    datalists: str | os.PathLike | Mapping[str, str | os.PathLike],
    keys: Sequence[str] = ("training", "validation"),
    num_classes: int | None = None,
    task: str = "segmentation",
    base_dir: str | os.PathLike | None = None,
    allow_missing_classes: bool = False,
    label_values: Sequence[int] | None = None,
    allow_leakage: bool = False,
    class_names: Sequence[str] | None = None,
) -> None:
    """Check the ``keys`` lists before a bundle run; on any problem print them all and exit with status 1
    (``SystemExit`` passes through MONAI's config parser, so the user sees the report, not a traceback).

    ``datalists`` is one datalist file holding every list, or a file per list (a bundle's ``datalists``).
    ``allow_missing_classes`` (the bundle key of that name) turns "class N never appears" in every list but
    ``training`` into a logged warning, for a small validation split that lacks a rare class; a class absent from
    the training list stays an error. ``label_values``: see :func:`check_datalist` (a bad list raises
    :class:`~medkd.errors.ConfigError`). An image file in one of ``keys`` and in another of the ``training``,
    ``validation`` and ``test`` lists is a problem (:func:`shared_images`), a logged warning with
    ``allow_leakage`` (the bundle key of that name). In a ``torchrun`` run, rank 0 checks and the other processes
    go on. ``class_names``: the bundle's, by which labels that name a class are read
    (:func:`~medkd.data.loading.load_datalist`).
    """
    if label_values is not None and num_classes is not None and task == "segmentation":
        label_values = check_label_values(label_values, num_classes)
    if is_not_rank0():
        return
    files = {key: datalists[key] if isinstance(datalists, Mapping) else datalists for key in keys}
    errors = []
    checked: dict[str, list[dict]] = {}
    for key, datalist_file in files.items():
        source = str(datalist_file)
        try:
            items = checked[key] = load_datalist(datalist_file, key=key, base_dir=base_dir, class_names=class_names)
        except DataError as e:
            errors.append(f"[{key}] {e}")
            continue
        if unlabelled := [e for e in items if e.get("label") in (None, "")]:
            errors.append(
                f"[{key}] {len(unlabelled)} of the {len(items)} entries of {source} ['{key}'] have no label (e.g. "
                f"{unlabelled[0]['image']}): training and evaluation need labels. Label them, or run the images "
                "through inference (configs/inference.json), which needs none."
            )
            continue
        problems = check_datalist(items, num_classes, task, source=source, label_values=label_values)
        problems = accept_missing_classes(
            problems, allow_missing_classes and key != "training", f"{source} ['{key}']", task
        )
        if task == "classification" and not problems and len(present := {e["label"] for e in items}) < 2:
            errors.append(
                f"[{key}] {source} ['{key}'] holds only class {sorted(present)}: its AUC, which chooses the best "
                "checkpoints and scores the networks, needs at least two classes. Add images of another class."
            )
            continue
        if not problems:
            continue
        errors.append(f"[{key}] {format_problems(problems, source)}")
        kinds = {p.kind for p in problems}
        if key != "training" and MISSING_CLASS in kinds and OUTSIDE_VALUES not in kinds:
            errors.append(
                f"[{key}] A class absent from a small {key} split can be accepted with --allow_missing_classes True "
                "(see docs/data.md)."
            )
    if not errors and (leaks := shared_images(_with_other_lists(checked, datalists, base_dir, class_names), keys)):
        if not allow_leakage:
            errors += [*leaks, LEAKAGE_HINT]
        for line in leaks if allow_leakage else []:
            logger.warning("%s; accepted (allow_leakage)", line)
    if errors:
        print("\n".join(f"ERROR: {e}" for e in errors), file=sys.stderr, flush=True)
        raise SystemExit(1)
    logger.info("data check passed for %s", ", ".join(f"{key} ({file})" for key, file in files.items()))


LEAKAGE_HINT = (
    "[leakage] A score on a list that shares images with the training list (or the validation list that picks the "
    "checkpoint) is optimistic. Keep each image in one list: fix the datalist, or delete the split file to split "
    "again (see docs/data.md); --allow_leakage True runs anyway."
)


def _with_other_lists(
    checked: Mapping[str, list[dict]],
    datalists: str | os.PathLike | Mapping[str, str | os.PathLike],
    base_dir: str | os.PathLike | None,
    class_names: Sequence[str] | None = None,
) -> dict[str, list[dict]]:
    """The lists already ``checked``, then the other ``training``, ``validation`` and ``test`` lists of ``datalists``
    that can be read (a list the datalists lack is left out)."""
    lists = dict(checked)
    for key in ("training", "validation", "test"):
        if key in lists or (isinstance(datalists, Mapping) and key not in datalists):
            continue
        try:
            source = datalists[key] if isinstance(datalists, Mapping) else datalists
            lists[key] = load_datalist(source, key, base_dir, class_names)
        except DataError:
            continue
    return lists


def shared_images(lists: Mapping[str, Sequence[Mapping[str, Any]]], keys: Sequence[str], shown: int = 3) -> list[str]:
    """One line for each pair of ``lists`` (at least one of them in ``keys``) that hold the same image file (the same
    real path; each file of a multi-file image counts), naming up to ``shown`` of the files; ``[]`` when none is."""
    files = {
        name: {os.path.realpath(f): f for e in items for f in ensure_tuple(e["image"])} for name, items in lists.items()
    }
    names = list(files)
    lines = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if a not in keys and b not in keys:
                continue
            both = sorted(files[a].keys() & files[b].keys())
            if both:
                more = f" and {len(both) - shown} more" if len(both) > shown else ""
                lines.append(
                    f"[leakage] {len(both)} image file(s) are in both the {a!r} and the {b!r} list: "
                    f"{', '.join(files[a][f] for f in both[:shown])}{more}"
                )
    return lines


def infer_task(items: Sequence[Mapping[str, Any]], label_key: str = "label") -> str:
    """``"classification"`` when every label of ``items`` is an integer class index, else ``"segmentation"``."""
    labels = [it[label_key] for it in items if isinstance(it, Mapping) and label_key in it]
    is_index = [isinstance(x, int | np.integer) and not isinstance(x, bool) for x in labels]
    return "classification" if labels and all(is_index) else "segmentation"
