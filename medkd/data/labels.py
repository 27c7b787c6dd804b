"""The classes of a task, defined once: read from the datalist's ``labels`` map.

The map's keys are the values that stand for each class in the label maps, e.g. ``{"0": "background", "1":
"necrosis", "2": "edema", "4": "enhancing"}`` (BraTS) or ``{"0": "background", "255": "lesion"}`` (a 0/255 mask). The
networks predict class indices ``0..N-1`` in the order of the values; :func:`label_mapping` maps the label maps' values
to those indices when the data are loaded, and back when segmentations are written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from monai.transforms import MapLabelValued

from medkd.data.datalists import csv_class_names
from medkd.errors import ConfigError, DataError

__all__ = [
    "datalist_labels",
    "datalist_class_names",
    "optional_class_names",
    "label_values",
    "optional_label_values",
    "check_label_values",
    "label_mapping",
    "value_dtype",
    "foreground",
]


def datalist_labels(datalist_file: str | os.PathLike) -> dict[int, str]:
    """The ``labels`` map of a Decathlon datalist as ``{value: class name}``, in the order of the values. A map from
    names to values (nnU-Net v2's ``{"background": 0, "liver": 1}``) is read the same way.

    Raises:
        DataError: naming the file when it has no usable ``labels`` map (missing, not JSON, keys that are not
            distinct non-negative integers).
    """
    path = Path(datalist_file)
    if path.suffix.lower() == ".csv" and path.is_file():
        raise DataError(
            f"the datalist {path} is a CSV file, which has no 'labels' map and whose labels are class indices: give "
            "the classes on the command line, --class_names \"['benign', 'malignant']\" (num_classes follows), or "
            "write the class names in its label column."
        )
    try:
        labels = json.loads(path.read_text()).get("labels")
    except FileNotFoundError as e:
        raise DataError(
            f"the datalist {path} does not exist; check --dataset_dir (the folder holding dataset.json) or "
            "--datalist_file (with --datalists of your own, give the classes: --class_names \"['a', 'b']\")."
        ) from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(
            f"the datalist {path} is not valid JSON ({e}); fix the syntax, e.g. with `python -m json.tool {path}`."
        ) from e
    except OSError as e:
        raise DataError(f"cannot read the datalist {path}: {e}") from e
    except AttributeError as e:
        raise DataError(f"the datalist {path} must hold a JSON object with a 'labels' map and the lists.") from e
    if not isinstance(labels, dict) or not labels:
        raise DataError(
            f'the datalist {path} has no \'labels\' map ({{"0": "background", "1": "organ", ...}}); add one, '
            "or give the classes on the command line: --num_classes N --class_names \"['background', ...]\"."
        )
    if any(isinstance(v, list) for v in labels.values()):
        raise DataError(
            f"the 'labels' map of {path} has region-based labels (lists of values, as nnU-Net v2 allows); medkd "
            "trains one class per value: give each class its own value."
        )
    if all(type(v) is int for v in labels.values()):  # nnU-Net v2 writes {"background": 0, "liver": 1}
        if len(set(labels.values())) != len(labels):
            raise DataError(f"the 'labels' map of {path} gives two classes one value: {labels}.")
        labels = {str(v): name for name, v in labels.items()}
    try:
        values = {int(k): k for k in labels}
    except ValueError as e:
        raise DataError(
            f"the 'labels' map of {path} must have integer keys (the value of each class in the label maps), got "
            f"{sorted(labels)}."
        ) from e
    if len(values) != len(labels) or min(values) < 0:
        raise DataError(
            f"the 'labels' map of {path} must have distinct non-negative integer keys, got {sorted(labels)}."
        )
    return {v: str(labels[values[v]]) for v in sorted(values)}


def datalist_class_names(datalist_file: str | os.PathLike, task: str = "segmentation") -> list[str]:
    """Class names, in the order of their values in the ``labels`` map (:func:`datalist_labels`).

    For ``task="classification"`` the keys must be the class indices ``0..N-1``, since a sample's label is its
    class index.

    A CSV datalist whose ``label`` column holds class names has those, sorted
    (:func:`medkd.data.datalists.csv_class_names`).

    Raises:
        DataError: naming the file when it has no usable ``labels`` map.
    """
    if Path(datalist_file).suffix.lower() == ".csv" and Path(datalist_file).is_file():
        names = csv_class_names(datalist_file)
        if names is not None:
            return names
    labels = datalist_labels(datalist_file)
    if task == "classification" and list(labels) != list(range(len(labels))):
        raise DataError(
            f"the 'labels' map of {datalist_file} must number the classes 0..N-1 for classification (a sample's "
            f"label is its class index), got {list(labels)}; renumber the map and the samples' labels."
        )
    return list(labels.values())


def optional_class_names(datalist: str | os.PathLike | Mapping[str, str | os.PathLike]) -> list[str] | None:
    """The class names of :func:`datalist_class_names`, or ``None`` where the datalist has none (a CSV file of class
    indices, a missing or broken file): for tools to which the names are optional. ``datalist`` is a datalist file,
    or a file per list (the ``training`` list's is read)."""
    path = datalist.get("training") if isinstance(datalist, Mapping) else datalist
    try:
        return None if path is None else datalist_class_names(path)
    except DataError:
        return None


def optional_label_values(datalist: str | os.PathLike | Mapping[str, str | os.PathLike]) -> list[int] | None:
    """The label values of the ``labels`` map (:func:`datalist_labels`), or ``None`` where there is no usable map."""
    labels = _optional_labels(datalist)
    return None if labels is None else list(labels)


def _optional_labels(datalist: str | os.PathLike | Mapping[str, str | os.PathLike]) -> dict[int, str] | None:
    path = datalist.get("training") if isinstance(datalist, Mapping) else datalist
    if path is None:
        return None
    try:
        return datalist_labels(path)
    except DataError:
        return None


def label_values(datalist_file: str | os.PathLike, class_names: Sequence[str]) -> list[int]:
    """The value of each class in the label maps: the keys of the datalist's ``labels`` map when its names are
    ``class_names``; otherwise (a CSV datalist, no map, other class names given on the command line) ``0..N-1``."""
    labels = _optional_labels(datalist_file)
    if labels is not None and list(labels.values()) == list(class_names):
        return list(labels)
    return list(range(len(class_names)))


def check_label_values(values: Sequence[int], num_classes: int) -> list[int]:
    """``values`` as a list of ints after checking them: one distinct non-negative integer per class.

    Raises:
        ConfigError: naming the ``label_values`` key and what to give instead.
    """
    given = list(values) if isinstance(values, Sequence) and not isinstance(values, str) else None
    ok = given is not None and all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in given)
    if not ok or len(given) != num_classes or len(set(given)) != len(given) or min(given, default=0) < 0:
        raise ConfigError(
            f"label_values {values!r} must list {num_classes} distinct non-negative integers, the value of each class "
            f'in the label maps in class order (e.g. --label_values "{list(range(num_classes))}"), or be left to the '
            "datalist's 'labels' map."
        )
    return [int(v) for v in given]


def label_mapping(
    keys: str | Sequence[str], values: Sequence[int], num_classes: int, to_values: bool = False
) -> MapLabelValued:
    """MONAI's ``MapLabelValued`` from the label maps' ``values`` to the class indices ``0..N-1`` (``to_values``:
    from the indices back to the values, for predictions to be written). Keys missing from a sample are skipped, so
    one transform serves the stages with and without labels. A value not in ``values`` is left as it is (the data
    check reports such values before a run)."""
    values = check_label_values(values, num_classes)
    indices = list(range(num_classes))
    orig, target = (indices, values) if to_values else (values, indices)
    return MapLabelValued(keys, orig_labels=orig, target_labels=target, allow_missing_keys=True)


def value_dtype(values: Sequence[int]) -> type:
    """The smallest unsigned integer type that holds every value in ``values`` (for writing label maps)."""
    top = max(values, default=0)
    return np.uint8 if top < 2**8 else np.uint16 if top < 2**16 else np.uint32


def foreground(class_names: Sequence[str]) -> list[str]:
    """The class names but the background (index 0), in order: the classes a Dice without background scores."""
    return list(class_names[1:])
