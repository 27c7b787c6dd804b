"""The classes of a task, defined once: read from the datalist's ``labels`` map."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from medkd.data.loading import DataError

__all__ = ["datalist_class_names", "optional_class_names", "foreground"]


def datalist_class_names(datalist_file: str) -> list[str]:
    """Class names, index order, from the ``labels`` map (``{"0": "background", ...}``) of a Decathlon datalist.

    Raises:
        DataError: naming the file when it has no usable ``labels`` map.
    """
    path = Path(datalist_file)
    try:
        labels = json.loads(path.read_text()).get("labels")
    except FileNotFoundError as e:
        raise DataError(
            f"the datalist {path} does not exist; check --dataset_dir (the folder holding dataset.json) or "
            "--datalist_file."
        ) from e
    except json.JSONDecodeError as e:
        raise DataError(
            f"the datalist {path} is not valid JSON ({e}); fix the syntax, e.g. with `python -m json.tool {path}`."
        ) from e
    except OSError as e:
        raise DataError(f"cannot read the datalist {path}: {e}") from e
    if not isinstance(labels, dict) or not labels:
        raise DataError(
            f'the datalist {path} has no \'labels\' map ({{"0": "background", "1": "organ", ...}}); add one, '
            "or give the classes on the command line: --num_classes N --class_names \"['background', ...]\"."
        )
    try:
        indices = sorted(int(k) for k in labels)
    except ValueError as e:
        raise DataError(f"the 'labels' map of {path} must have integer keys, got {sorted(labels)}.") from e
    if indices != list(range(len(indices))):
        raise DataError(f"the 'labels' map of {path} must number the classes 0..N-1, got {indices}.")
    return [str(labels[str(i)]) for i in indices]


def optional_class_names(datalist: str | os.PathLike | Mapping[str, str | os.PathLike]) -> list[str] | None:
    """The class names of :func:`datalist_class_names`, or ``None`` where the datalist has no usable ``labels`` map
    (a CSV file, a missing or broken file): for tools to which the names are optional. ``datalist`` is a datalist
    file, or a file per list (the ``training`` list's is read)."""
    path = datalist.get("training") if isinstance(datalist, Mapping) else datalist
    if path is None:
        return None
    try:
        return datalist_class_names(str(path))
    except DataError:
        return None


def foreground(class_names: Sequence[str]) -> list[str]:
    """The class names but the background (index 0), in order: the classes a Dice without background scores."""
    return list(class_names[1:])
