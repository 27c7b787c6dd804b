"""Datalists: Decathlon-style JSON files and ``image,label`` CSV files read as lists of entries.

* :func:`load_datalist` reads one list of a datalist as ``{"image": ..., "label": ...}`` dicts with absolute paths.
* :func:`csv_lists` and :func:`csv_class_names`: the lists and the class names a CSV datalist holds.
* Every problem is raised as :class:`~medkd.errors.DataError`, whose message names the file, the line and the fix.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.data import load_decathlon_datalist

from medkd.data.formats import IMAGE_SUFFIXES
from medkd.errors import DataError

__all__ = ["SPLIT_COLUMN", "SPLIT_NAMES", "csv_class_names", "csv_lists", "load_datalist"]

PathLike = str | os.PathLike

SPLIT_COLUMN = "split"  # a CSV datalist's optional column naming each row's list
SPLIT_NAMES = {  # the names a split cell may hold, and the list each names
    "training": "training",
    "train": "training",
    "validation": "validation",
    "val": "validation",
    "valid": "validation",
    "test": "test",
}


def load_datalist(
    path: PathLike, key: str = "training", base_dir: PathLike | None = None, class_names: Sequence[str] | None = None
) -> list[dict]:
    """Load a datalist as a list of ``{"image": ..., "label": ...}`` dicts with absolute paths.

    Args:
        path: a Decathlon-style ``.json`` file (``{"training": [{"image": .., "label": ..}, ..]}``) or a ``.csv``
            file with an ``image`` column and optional ``label`` and ``split`` columns. A CSV label is an integer class
            index (classification) or a path (segmentation); a ``split`` cell names the row's list (``training``,
            ``validation``, ``test``, or ``train``, ``val``, ``valid``); other columns are kept as strings. A UTF-8
            byte-order mark (Excel's "CSV UTF-8") is accepted.
        key: list to read (``training``, ``validation``, ``test``, ...); a CSV file without a ``split`` column is
            one list, read whatever the key (:func:`csv_lists`).
        base_dir: folder relative paths are resolved against; defaults to the datalist's folder.
        class_names: class names by index: a label that is one of them becomes its index (classification lists that
            name the classes, ``"label": "malignant"``). Default: a JSON datalist's ``labels`` map, or a CSV file's
            own class names (:func:`csv_class_names`); give them wherever several files make up the lists, so that
            every file numbers the classes alike.

    Raises:
        DataError: the file is missing or malformed (bad JSON, missing key or columns, entries without image, CSV
            labels that are neither integer class indices, class names nor label-map paths, CSV split names that
            name no list, no CSV row of the ``key`` list).
    """
    path = _existing(path)
    if path.suffix.lower() == ".csv":
        return _load_csv(path, base_dir, key, class_names)
    return _load_json(path, key, base_dir, class_names)


def csv_lists(path: PathLike) -> list[str]:
    """The lists a CSV datalist holds, in the order ``training``, ``validation``, ``test``: those its ``split``
    column names, or ``["training"]`` for a file without one (one list, which the bundles split,
    :mod:`medkd.data.held_out`).

    Raises:
        DataError: as :func:`load_datalist`.
    """
    path = _existing(path)
    columns, rows = _read_csv(path)
    if SPLIT_COLUMN not in columns:
        return ["training"]
    names = {_split_name(path, line, row) for line, row in rows}
    return [key for key in dict.fromkeys(SPLIT_NAMES.values()) if key in names]


def _existing(path: PathLike) -> Path:
    path = Path(path).expanduser().absolute()
    if not path.is_file():
        raise DataError(f"Datalist '{path}' does not exist. Pass the path of a .json or .csv datalist.")
    return path


def _load_json(path: Path, key: str, base_dir: PathLike | None, class_names: Sequence[str] | None) -> list[dict]:
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(
            f"Datalist '{path}' is not valid JSON ({e}). Fix the syntax, e.g. with `python -m json.tool`."
        ) from e
    if not isinstance(content, dict):
        raise DataError(
            f'Datalist \'{path}\' must be a JSON object like {{"{key}": [{{"image": ..., "label": ...}}]}}, '
            f"got a {type(content).__name__}."
        )
    if key not in content:
        lists = [k for k, v in content.items() if isinstance(v, list)]
        raise DataError(
            f"Datalist '{path}' has no '{key}' list (lists found: {lists or 'none'}). Use one of those keys."
        )
    entries = content[key]
    if not isinstance(entries, list):
        raise DataError(f"Datalist '{path}': '{key}' must be a list of entries, got a {type(entries).__name__}.")
    for i, entry in enumerate(entries):
        if isinstance(entry, dict) and "image" not in entry:
            raise DataError(f"Datalist '{path}': entry {i} of '{key}' has no 'image' field ({entry}). Add it.")
        if not isinstance(entry, dict | str):
            raise DataError(f"Datalist '{path}': entry {i} of '{key}' must be an object or a path, got {entry!r}.")
    if not entries:
        return []
    if all(isinstance(e, str) for e in entries):  # Decathlon "test" lists hold bare paths
        base = Path(base_dir).expanduser() if base_dir is not None else path.parent
        return [{"image": _resolve(base, e)} for e in entries]
    if any(isinstance(e, str) for e in entries):
        raise DataError(f"Datalist '{path}': '{key}' mixes bare paths and objects. Use {{\"image\": ...}} everywhere.")
    items = [
        dict(item) for item in load_decathlon_datalist(path, is_segmentation=True, data_list_key=key, base_dir=base_dir)
    ]
    labels = content.get("labels")
    names = list(class_names) if class_names else list(labels.values()) if isinstance(labels, dict) else []
    for i, (item, entry) in enumerate(zip(items, entries, strict=True)):  # MONAI resolved every label as a path
        label = entry.get("label")
        if isinstance(label, str) and label in names:
            item["label"] = names.index(label)
        elif isinstance(label, str) and _is_number(label.strip()) and not Path(item["label"]).is_file():
            item["label"] = _numeric_label(path, key, i, label.strip())
    return items


def _numeric_label(path: Path, key: str, index: int, label: str) -> int:
    """A JSON label written as a number in a string (``"1"``, as a spreadsheet exports it): the class index it
    names, or a :class:`DataError` when it is no integer (``"1.0"``)."""
    if _is_int(label):
        return int(label)
    raise DataError(
        f"Datalist '{path}': the label {label!r} of entry {index} of '{key}' is neither a class index nor the path "
        'of a label map. Write classification labels as integer class indices (1, not "1.0") or class names.'
    )


def _read_csv(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """A CSV datalist's columns and its rows (line number, cells stripped); every row has an image."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: Excel writes a byte-order mark
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = [c.strip() for c in reader.fieldnames or []]
    except (csv.Error, UnicodeDecodeError) as e:
        raise DataError(f"Datalist '{path}' is not a readable CSV file ({e}).") from e
    if "image" not in columns:
        raise DataError(
            f"Datalist '{path}' has no 'image' column (columns found: {columns}). "
            "The first line must be a header such as 'image,label'."
        )
    cells = []
    for line, row in enumerate(rows, start=2):
        if None in row:  # csv.DictReader keeps the cells past the header's columns under None
            raise DataError(
                f"Datalist '{path}', line {line}: {len(columns) + len(row[None])} cells, but the header names "
                f"{len(columns)} columns ({', '.join(columns)}). Name every column in the header, or quote cells "
                'that hold a comma ("a, b").'
            )
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        if not row.get("image"):
            raise DataError(f"Datalist '{path}', line {line}: the 'image' cell is empty. Fill it or delete the row.")
        cells.append((line, row))
    return columns, cells


def _split_name(path: Path, line: int, row: Mapping[str, str]) -> str:
    """The list a CSV row's ``split`` cell names."""
    cell = row.get(SPLIT_COLUMN, "")
    if cell.lower() not in SPLIT_NAMES:
        raise DataError(
            f"Datalist '{path}', line {line}: the 'split' cell {cell!r} names no list. Write training, validation or "
            "test (or train, val, valid)."
        )
    return SPLIT_NAMES[cell.lower()]


def _load_csv(path: Path, base_dir: PathLike | None, key: str, class_names: Sequence[str] | None) -> list[dict]:
    base = Path(base_dir).expanduser() if base_dir is not None else path.parent
    columns, rows = _read_csv(path)
    all_rows = rows  # the class names are those of every list of the file
    if SPLIT_COLUMN in columns:
        wanted = SPLIT_NAMES.get(key, key)
        named = [(line, row) for line, row in rows if _split_name(path, line, row) == wanted]
        if not named:
            raise DataError(
                f"Datalist '{path}' has no row whose split is {wanted!r} (lists found: {csv_lists(path)}). Add rows "
                "to that list, or leave the split column out to have the bundles hold out validation and test rows."
            )
        rows = [(line, {k: v for k, v in row.items() if k != SPLIT_COLUMN}) for line, row in named]
    items = []
    bad_labels: list[tuple[int, str]] = []
    empty = [line for line, row in rows if not row.get("label")]
    if "label" in columns and empty and len(empty) < len(rows):
        shown = ", ".join(map(str, empty[:10])) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
        raise DataError(
            f"Datalist '{path}': the 'label' cell is empty on line(s) {shown} of the {key!r} list, but not on its "
            "other lines. Fill them or delete those rows (a list without labels, e.g. images to segment, leaves every "
            "cell empty)."
        )
    found = _class_names(path, base, columns, all_rows)
    names = list(class_names) if class_names and found else found
    for line, row in rows:
        item: dict[str, Any] = {k: v for k, v in row.items() if k != "label"}
        item["image"] = _resolve(base, row["image"])
        if "label" in columns and (label := row.get("label", "")):
            if names is not None and label in names:
                item["label"] = names.index(label)
            elif _is_int(label) and names is None:
                item["label"] = int(label)
            elif _looks_like_path(base, label):
                item["label"] = _resolve(base, label)
            else:
                bad_labels.append((line, label))
        items.append(item)
    if bad_labels:
        named = [(line, row["label"]) for line, row in rows if names is not None and row.get("label") in names]
        if len(named) < len(bad_labels) and all(_is_int(label) for _, label in bad_labels):
            raise DataError(_odd_names_message(path, key, named, len(bad_labels)))
        raise DataError(_label_message(path, bad_labels, names))
    return items


def csv_class_names(path: PathLike, base_dir: PathLike | None = None) -> list[str] | None:
    """The class names a CSV datalist's ``label`` column holds instead of class indices (``benign``, ``malignant``),
    sorted: class ``i`` is the ``i``-th name (as :mod:`medkd.prepare` numbers class folders), in every list of the
    file. ``None`` when its labels are class indices, label-map paths or empty (paths are resolved against
    ``base_dir``, default the file's folder)."""
    path = _existing(path)
    base = Path(base_dir).expanduser() if base_dir is not None else path.parent
    return _class_names(path, base, *_read_csv(path))


def _class_names(
    path: Path, base: Path, columns: Sequence[str], rows: Sequence[tuple[int, Mapping[str, str]]]
) -> list[str] | None:
    """:func:`csv_class_names` of a file already read (:func:`_read_csv`)."""
    if "label" not in columns:
        return None
    cells = {row.get("label", "") for _, row in rows} - {""}
    words = {c for c in cells if not _is_number(c) and not _looks_like_path(base, c)}
    alike: dict[str, list[str]] = {}
    for word in sorted(words):
        alike.setdefault(word.casefold(), []).append(word)
    if clash := next((names for names in alike.values() if len(names) > 1), None):
        raise DataError(
            f"Datalist '{path}': the class names {clash} differ only in case, so they would be classes of their own. "
            "Write each class one way."
        )
    return sorted(words) if words else None


def _looks_like_path(base: Path, text: str) -> bool:
    """Whether a CSV label names a label map: it has a folder part or an image suffix, or the file exists (a folder
    named like a class, ``benign/``, is not one)."""
    p = Path(text).expanduser()
    return (
        "/" in text
        or "\\" in text
        or text.lower().endswith(IMAGE_SUFFIXES)
        or (base / p).is_file()
        or (p.is_absolute() and p.is_file())
    )


def _label_message(path: Path, bad: Sequence[tuple[int, str]], names: Sequence[str] | None = None) -> str:
    shown = ", ".join(f"{value!r} (line {line})" for line, value in bad[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    verb = "is" if len(bad) == 1 else "are"
    if names is not None:
        return (
            f"Datalist '{path}': {'label' if len(bad) == 1 else 'labels'} {shown}{more} {verb} not one of the class "
            f"names {list(names)}. Write each label as one of them (or every label as a class index 0..N-1), or give "
            "every class name (--class_names)."
        )
    return (
        f"Datalist '{path}': {'label' if len(bad) == 1 else 'labels'} {shown}{more} {verb} neither an integer class "
        "index, a class name nor the path of a label map. Classification labels are class indices 0..N-1 (write 1, "
        "not 1.0) or class names; for segmentation, the label must be the path of an existing label map."
    )


def _odd_names_message(path: Path, key: str, named: Sequence[tuple[int, str]], indices: int) -> str:
    """The message for a few class-name labels among more class indices: the names are the odd cells out."""
    shown = ", ".join(f"{value!r} (line {line})" for line, value in named[:5])
    more = f" and {len(named) - 5} more" if len(named) > 5 else ""
    one = len(named) == 1
    return (
        f"Datalist '{path}': {'label' if one else 'labels'} {shown}{more} "
        f"{'is a class name' if one else 'are class names'} but the other {indices} labels of the {key!r} list are "
        "class indices. Write "
        f"{'it as a class index' if one else 'them as class indices'} too (0..N-1), or every label as a class name."
    )


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _is_int(text: str) -> bool:
    return text.lstrip("+-").isdigit()


def _resolve(base: Path, value: str) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else base / p)
