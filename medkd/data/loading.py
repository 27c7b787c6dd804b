"""Data layer: datalists and robust image loading built on MONAI readers.

* :func:`load_datalist` reads a Decathlon-style JSON or an ``image,label`` CSV.
* :func:`find_images` lists the images of a folder that the loaders read (inference's ``--input_dir``).
* :class:`LoadMedicalImage` / :class:`LoadMedicalImaged` wrap :class:`monai.transforms.LoadImage` and pick the
  reader from the path: NIfTI (``NibabelReader``), DICOM files and series folders (:class:`DicomReader`),
  PNG/JPEG/BMP (``PILReader``) and ``.npy``/``.npz`` (``NumpyReader``).
* Every failure is raised as :class:`DataError`, whose message names the file, the problem and the fix.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
import warnings
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.data import MetaTensor, NibabelReader, NumpyReader, PILReader, PydicomReader, load_decathlon_datalist
from monai.data.image_reader import ImageReader
from monai.data.utils import affine_to_spacing
from monai.transforms import LoadImage, MapTransform, Transform
from monai.utils import MetaKeys, ensure_tuple

from medkd.errors import MedkdError

__all__ = [
    "DataError",
    "DicomReader",
    "LoadMedicalImage",
    "LoadMedicalImaged",
    "DropUnitAxesd",
    "csv_lists",
    "csv_class_names",
    "drop_unit_axes",
    "find_images",
    "image_loader",
    "is_image_file",
    "load_datalist",
    "unit_axes",
    "reader_for",
    "reader_kind",
]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
NUMPY_SUFFIXES = (".npy", ".npz")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + DICOM_SUFFIXES + PIL_SUFFIXES + NUMPY_SUFFIXES
ORIENTATION_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # MONAI's default, given to silence its notice
SPLIT_COLUMN = "split"  # a CSV datalist's optional column naming each row's list
SPLIT_NAMES = {  # the names a split cell may hold, and the list each names
    "training": "training",
    "train": "training",
    "validation": "validation",
    "val": "validation",
    "valid": "validation",
    "test": "test",
}
SUPPORTED = (
    "NIfTI (.nii, .nii.gz), DICOM (.dcm/.dicom/.ima, extension-less files, or a folder with one series), "
    "PNG/JPEG/BMP, NumPy (.npy/.npz)"
)


class DataError(MedkdError, ValueError):
    """Invalid or unreadable input data; the message says which file, what is wrong and what to do."""


# --------------------------------------------------------------------------------------------------- datalists


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


# ------------------------------------------------------------------------------------------- folders of images


def _is_dicom_file(path: Path) -> bool:
    return path.name.lower().endswith(DICOM_SUFFIXES) or _sniff_dicom(path)


def is_image_file(path: PathLike) -> bool:
    """Whether the file ``path`` has a format the loaders read: by its suffix, or, without a known one, DICOM by its
    content (PACS exports name files ``IM0001`` or by their UID)."""
    path = Path(path)
    return path.name.lower().endswith(NIFTI_SUFFIXES + PIL_SUFFIXES + NUMPY_SUFFIXES) or _is_dicom_file(path)


def _is_image(path: Path) -> bool:
    """A file of a format the loaders read, or a folder holding DICOM files (one series)."""
    if path.is_dir():
        return any(f.is_file() and not f.name.startswith(".") and _is_dicom_file(f) for f in path.iterdir())
    return is_image_file(path)


def _contents(folder: Path) -> str:
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    if not entries:
        return "it is empty"
    files = sum(p.is_file() for p in entries)
    shown = [p.name + ("/" if p.is_dir() else "") for p in entries[:5]]
    more = ", ..." if len(entries) > 5 else ""
    return f"it holds {files} file(s) and {len(entries) - files} folder(s): {', '.join(shown)}{more}"


def find_images(input_dir: PathLike, pattern: str | None = None) -> list[str]:
    """The images in ``input_dir``, sorted: by default every entry the loaders read (NIfTI ``.nii``/``.nii.gz``,
    DICOM files, with or without extension, and sub-folders holding a DICOM series, PNG/JPEG/BMP, NumPy), other
    files (``README.txt``, ``.mha``, hidden files) being left out; with ``pattern`` (a glob such as ``"*.nii.gz"``
    or ``"*/"``), the entries matching it.

    A folder of DICOM slices is one image only when it is a sub-folder of ``input_dir``; the files directly in
    ``input_dir`` are each an image.

    Raises:
        DataError: the folder does not exist, is a file, or holds no image (the message says what it holds).
    """
    folder = Path(input_dir).expanduser()
    if not folder.exists():
        raise DataError(
            f"Input folder '{folder}' does not exist. Pass --input_dir the folder that holds the images to process."
        )
    if not folder.is_dir():
        raise DataError(
            f"Input folder '{folder}' is a file, not a folder. Pass its folder as --input_dir (with --input_pattern "
            f"'{folder.name}' to process only this file)."
        )
    if pattern:
        found = sorted(str(Path(p)) for p in glob.glob(os.path.join(str(folder), pattern)))
        wanted, fix = (
            f"matching input_pattern '{pattern}'",
            "Fix --input_pattern, or leave it out to take every image of a supported format",
        )
    else:
        found = [str(p) for p in sorted(folder.iterdir()) if not p.name.startswith(".") and _is_image(p)]
        wanted, fix = (
            f"in a supported format ({SUPPORTED})",
            "Point --input_dir at the folder holding the images, or convert them to a supported format",
        )
    if not found:
        raise DataError(f"Input folder '{folder}' holds no image {wanted}: {_contents(folder)}. {fix}.")
    return found


def inference_items(
    input_dir: PathLike | None,
    pattern: str | None,
    datalist: PathLike,
    key: str = "test",
    base_dir: PathLike | None = None,
    spatial_dims: int | None = None,
    name_apart: bool = True,
) -> list[dict]:
    """The inputs of an inference run as ``[{"image": path or paths, "case": name}, ...]``: the images of
    ``input_dir`` (:func:`find_images`), or without one, the images of the datalist's ``key`` list. Where that list's
    cases are several files, one per channel, the files of ``input_dir`` are grouped into cases named the same way
    (:func:`~medkd.data.cases.group_cases`). For 3D networks (``spatial_dims`` 3), an ``input_dir`` that holds only
    single-frame DICOM files is one series. ``case`` is the path the output is named after
    (:func:`~medkd.data.cases.case_name`); with ``name_apart``, cases whose outputs would share a name are renamed
    (:func:`~medkd.data.cases.distinct_names`; not for outputs of one file per run, such as a classifier's CSV).

    Raises:
        DataError: files of ``input_dir`` that form no case, or a list whose cases name their files in different ways.
    """
    from medkd.data.cases import case_name, channel_suffixes, group_cases

    if not input_dir:
        images = [item["image"] for item in load_datalist(datalist, key=key, base_dir=base_dir)]
        suffixes = channel_suffixes([{"image": image} for image in images])
        return _distinct_cases([{"image": image, "case": case_name(image, suffixes)} for image in images], name_apart)
    files = find_images(input_dir, pattern)
    if spatial_dims == 3 and _one_series(files):
        logger.info("the %d DICOM slices of %s are read as one series", len(files), input_dir)
        files = [str(Path(input_dir).expanduser())]
    try:
        entries = load_datalist(datalist, key=key, base_dir=base_dir)
    except DataError:  # no datalist beside the checkpoints: the folder's files are the cases
        entries = []
    listed = [e for e in entries if len(ensure_tuple(e["image"])) > 1]
    if not listed:  # cases of one file: named after it, without nnU-Net's channel suffix where the list's files have it
        suffixes = channel_suffixes(entries)
        return _distinct_cases([{"image": f, "case": case_name(f, suffixes)} for f in files], name_apart)
    suffixes = channel_suffixes(listed)
    example = ", ".join(str(f) for f in ensure_tuple(listed[0]["image"]))
    if suffixes is None:
        raise DataError(
            f"The cases of '{datalist}' ['{key}'] are several files each (e.g. {example}), named in different ways, so "
            f"the files of '{input_dir}' cannot be grouped into cases. List the new cases in a datalist instead "
            "(--datalists \"{'test': '/data/new.json'}\", as the training list lists its cases)."
        )
    cases, rest = group_cases(files, suffixes)
    if rest:
        shown = ", ".join(Path(f).name for f in rest[:5]) + (f" and {len(rest) - 5} more" if len(rest) > 5 else "")
        raise DataError(
            f"Input folder '{input_dir}': the networks take {len(suffixes)} files per case, named like the cases of "
            f"'{datalist}' (<case>{'/<case>'.join(suffixes)}, e.g. {example}); {shown} form no case. Add the missing "
            "files, or pick the cases' files with --input_pattern."
        )
    return _distinct_cases([{"image": case, "case": case_name(case)} for case in cases], name_apart)


def _distinct_cases(items: list[dict], enabled: bool = True) -> list[dict]:
    """``items`` with the cases whose outputs would have one name renamed (:func:`~medkd.data.cases.distinct_names`),
    each rename logged; as they are unless ``enabled``."""
    from medkd.data.cases import distinct_names

    if not enabled:
        return items
    names = distinct_names([item["case"] for item in items])
    for item, name in zip(items, names, strict=True):
        if name != item["case"]:
            logger.warning("%s: its output is named after %s, as another input has its name", item["image"], name)
            item["case"] = name
    return items


def _one_series(files: Sequence[str]) -> bool:
    """Whether ``files`` are several DICOM files of one frame each (the slices of a series, not volumes)."""
    import pydicom

    if len(files) < 2 or not all(Path(f).is_file() and reader_kind(f) == "dicom" for f in files):
        return False
    try:
        header = pydicom.dcmread(files[0], stop_before_pixels=True, force=True)
    except Exception:  # noqa: BLE001 - unreadable: each file is then skipped with its own reason
        return False
    return int(header.get("NumberOfFrames", 1) or 1) == 1


# ----------------------------------------------------------------------------------------------------- DICOM


def _normal(iop: Sequence[float]) -> np.ndarray:
    row, col = np.asarray(iop[:3], dtype=float), np.asarray(iop[3:6], dtype=float)
    return np.cross(row, col)


def _functional_group(ds: Any, frame: int, sequence: str, attr: str) -> Any:
    """Read ``attr`` of an enhanced multi-frame functional group, per-frame first then shared; None if absent."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        try:
            value = getattr(getattr(ds, groups)[index], sequence)[0].get(attr)
        except (AttributeError, IndexError):
            continue
        if value is not None:
            return value
    return None


GAP = 1.5  # a DICOM series whose slices are this many times further apart somewhere than their median step has a gap


class DicomReader(PydicomReader):
    """:class:`monai.data.PydicomReader` hardened for real-world files.

    Differences with the MONAI reader (pydicom does the decoding in both):

    * files without the 128-byte preamble or without file meta are read (``force=True`` by default, and the
      transfer syntax pydicom detected is recorded so the pixels can be decoded);
    * a folder is one series: non-DICOM files are ignored, slices are sorted by their position along the slice
      normal (MONAI sorts by ``InstanceNumber``) and the slice spacing comes from ``ImagePositionPatient``; a
      folder holding several series raises :class:`DataError`;
    * multi-frame files are returned as ``(columns, rows, frames)`` (MONAI puts frames on the 2nd axis) with the
      frame spacing taken from ``GridFrameOffsetVector`` (RT dose) or the enhanced functional groups.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("force", True)
        super().__init__(**kwargs)

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        return all(reader_kind(f, check_exists=False) == "dicom" for f in ensure_tuple(filename))

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs: Any):
        names = ensure_tuple(data)
        if len(names) == 1 and Path(names[0]).is_dir():
            return self._read_series_folder(Path(names[0]), **kwargs)
        if any(Path(n).is_dir() for n in names):
            raise DataError(f"Several DICOM folders given as one image ({names}); list one series folder per key.")
        result = super().read(data, **kwargs)
        for ds in result if isinstance(result, list) else [result]:
            _ensure_transfer_syntax(ds)
        return result

    def _read_series_folder(self, folder: Path, **kwargs: Any):
        import pydicom

        options = {**self.kwargs, **kwargs}
        datasets, files = [], []
        for f in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
            if not _sniff_dicom(f):
                continue
            try:
                ds = pydicom.dcmread(f, **options)
            except Exception as e:  # corrupt slice: name it rather than silently building a volume with a hole
                raise DataError(f"DICOM slice '{f}' in series folder '{folder}' cannot be read ({e}).") from e
            if "PixelData" in ds:  # skips DICOMDIR, structured reports, ...
                datasets.append(_ensure_transfer_syntax(ds))
                files.append(str(f))
        if not datasets:
            raise DataError(
                f"DICOM folder '{folder}' contains no DICOM image slices. Point the datalist at a folder holding "
                "the .dcm files of one series."
            )
        series = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
        if len(series) > 1:
            raise DataError(
                f"DICOM folder '{folder}' mixes {len(series)} series (SeriesInstanceUID). Move each series into its "
                "own folder and list the folders separately."
            )
        self.filenames = [files] if len(files) > 1 else files
        self.has_series = len(datasets) > 1
        return datasets if len(datasets) > 1 else datasets[0]

    def get_data(self, data: Any):
        array, meta = super().get_data(data)
        datasets = data if isinstance(data, list) else [data]
        colour = len(datasets) == 1 and not isinstance(datasets[0], list) and "SegmentSequence" not in datasets[0]
        if colour and int(datasets[0].get("SamplesPerPixel", 1)) > 1 and self._num_frames(datasets[0]) <= 1:
            # a colour image (ultrasound, photograph, slide): its samples are channels, not a third axis
            meta[MetaKeys.SPATIAL_SHAPE] = tuple(meta[MetaKeys.SPATIAL_SHAPE])[:-1]
            meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = -1
            meta["spacing"] = affine_to_spacing(meta[MetaKeys.ORIGINAL_AFFINE], r=2)
        return array, meta

    def _combine_dicom_series(self, data: Sequence, filenames: Sequence[PathLike]):
        slices, names = list(data), [str(f) for f in filenames]
        iop = slices[0].get("ImageOrientationPatient")
        if all("ImagePositionPatient" in s for s in slices) and iop is not None:
            normal = _normal(iop)
            pos = np.array([float(np.dot(normal, np.asarray(s.ImagePositionPatient, dtype=float))) for s in slices])
        else:
            warnings.warn(
                f"DICOM series '{os.path.dirname(names[0])}' lacks ImagePositionPatient/ImageOrientationPatient; "
                "slices are ordered by InstanceNumber and the slice spacing is unknown.",
                stacklevel=2,
            )
            pos = np.array([float(s.get("InstanceNumber", i) or i) for i, s in enumerate(slices)])
        order = np.argsort(pos, kind="stable")
        steps = np.diff(pos[order])
        if np.any(np.isclose(steps, 0.0)):
            dup = [names[order[i]] for i in np.flatnonzero(np.isclose(steps, 0.0))[:3]]
            raise DataError(
                f"DICOM series in '{os.path.dirname(names[0])}' has several slices at the same position (e.g. {dup}): "
                "it probably mixes acquisitions or echoes. Keep one slice per position in the folder."
            )
        if steps.size and steps.max() > GAP * np.median(steps):
            at = int(np.argmax(steps))
            raise DataError(
                f"DICOM series in '{os.path.dirname(names[0])}' has a gap: {os.path.basename(names[order[at]])} and "
                f"{os.path.basename(names[order[at + 1]])} are {steps[at]:.3g} mm apart, the other slices "
                f"{np.median(steps):.3g} mm (a missing slice?). On one regular grid the slices, and a segmentation, "
                "would be misplaced. Add the missing slices, or convert the series to NIfTI (e.g. dcm2niix)."
            )
        if steps.size and not np.allclose(steps, steps[0], rtol=0.05, atol=1e-3):
            logger.warning(
                "DICOM series '%s' has uneven slice spacing %s; the mean spacing is used.",
                os.path.dirname(names[0]),
                np.unique(steps.round(3)),
            )
        arrays = [self._get_array_data(slices[i], names[i]) for i in order]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise DataError(
                f"DICOM series in '{os.path.dirname(names[0])}' has slices of different sizes {sorted(shapes)}. "
                "Keep only the slices of one series in the folder."
            )
        first, last = slices[order[0]], slices[order[-1]]
        meta = self._get_meta_dict(first)
        meta["spacing"] = np.asarray([*(first.get("PixelSpacing") or [1.0, 1.0])][:2], dtype=float)
        if "ImagePositionPatient" in last and "00200032" in meta:
            meta["lastImagePositionPatient"] = np.asarray(last.ImagePositionPatient, dtype=float)
        meta[MetaKeys.SPATIAL_SHAPE] = arrays[0].shape + (len(arrays),)
        return np.stack(arrays, axis=-1), meta

    @staticmethod
    def _num_frames(img: Any) -> int:
        try:
            return int(img.get("NumberOfFrames", 1) or 1)
        except (TypeError, ValueError):
            return 1

    def _get_array_data(self, img, filename):
        data = super()._get_array_data(img, filename)
        if str(img.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
            data = _as_monochrome2(img, data)
        if self._num_frames(img) > 1 and "SegmentSequence" not in img:
            data = np.moveaxis(data, 0, 2)  # (frames, rows, cols[, samples]) -> (rows, cols, frames[, samples])
        return data

    def _get_meta_dict(self, img) -> dict:
        meta = super()._get_meta_dict(img)
        frames = self._num_frames(img)
        if frames <= 1 or "SegmentSequence" in img or int(img.get("SamplesPerPixel", 1)) != 1:
            return meta
        # enhanced multi-frame: geometry lives in the functional groups
        for tag, vr, seq, attr, frame in (
            ("00200037", "DS", "PlaneOrientationSequence", "ImageOrientationPatient", 0),
            ("00200032", "DS", "PlanePositionSequence", "ImagePositionPatient", 0),
            ("00280030", "DS", "PixelMeasuresSequence", "PixelSpacing", 0),
        ):
            value = _functional_group(img, frame, seq, attr)
            if tag not in meta and value is not None:
                meta[tag] = {"vr": vr, "Value": [float(v) for v in value]}
        if "00200032" not in meta or "00200037" not in meta:
            return meta
        first = np.asarray(meta["00200032"]["Value"], dtype=float)
        last_pos = _functional_group(img, frames - 1, "PlanePositionSequence", "ImagePositionPatient")
        offsets = img.get("GridFrameOffsetVector")
        if last_pos is not None and "PerFrameFunctionalGroupsSequence" in img:
            meta["lastImagePositionPatient"] = np.asarray(last_pos, dtype=float)
        elif offsets is not None and len(offsets) == frames:
            step = float(offsets[-1]) - float(offsets[0])
            meta["lastImagePositionPatient"] = first + _normal(meta["00200037"]["Value"]) * step
        else:
            thickness = float(img.get("SpacingBetweenSlices") or img.get("SliceThickness") or 1.0)
            meta["lastImagePositionPatient"] = first + _normal(meta["00200037"]["Value"]) * thickness * (frames - 1)
        return meta


def _as_monochrome2(ds: Any, data: np.ndarray) -> np.ndarray:
    """A MONOCHROME1 image (the lowest value white: radiographs kept as on film) in the sense of every other image
    (MONOCHROME2: the highest value white). Each value ``v`` becomes ``lo + hi - v``, with ``lo..hi`` the range its
    stored bits hold, after the rescale slope and intercept; integers stay integers of the same type."""
    bits = int(ds.get("BitsStored") or 16)
    signed = int(ds.get("PixelRepresentation") or 0) == 1
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    lo, hi = sorted((lo * slope + intercept, hi * slope + intercept))
    if np.issubdtype(data.dtype, np.integer):
        return (int(lo + hi) - data.astype(np.int64)).astype(data.dtype)
    return (lo + hi - data).astype(np.float32)


def _ensure_transfer_syntax(ds: Any) -> Any:
    """Give a dataset read without file meta (no preamble, raw dataset) the transfer syntax pydicom detected, so
    that ``pixel_array`` can decode it; MONAI's reader fails on such files."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return ds
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None:
        return ds
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = (
        ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    )
    return ds


def _sniff_dicom(path: Path) -> bool:
    """True when ``path`` looks like DICOM: 'DICM' at byte 128, or a preamble-less file starting with a group
    0002/0008 tag (little or big endian)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM" or head[:2] in (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08")


# ----------------------------------------------------------------------------------------------- image loading


def reader_kind(path: PathLike, check_exists: bool = True) -> str:
    """Return ``"nifti"``, ``"dicom"``, ``"pil"`` or ``"numpy"`` for ``path`` (a file or a DICOM series folder).

    Raises:
        DataError: the path does not exist (when ``check_exists``) or its format is not supported.
    """
    p = Path(path).expanduser()
    name = p.name.lower()
    if check_exists and not p.exists():
        raise DataError(
            f"Image file '{p}' not found. Check the path in the datalist (relative paths are resolved against the "
            "datalist's folder or the base_dir you pass)."
        )
    if p.is_dir():
        return "dicom"
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(PIL_SUFFIXES):
        return "pil"
    if name.endswith(NUMPY_SUFFIXES):
        return "numpy"
    if name.endswith(DICOM_SUFFIXES) or not p.exists() or _sniff_dicom(p):
        return "dicom"
    raise DataError(
        f"Image file '{p}' has an unsupported format. Supported: {SUPPORTED}. Convert it, e.g. "
        f"`SimpleITK.WriteImage(SimpleITK.ReadImage(path), 'image.nii.gz')`."
    )


_READERS: dict[str, type[ImageReader]] = {
    "nifti": NibabelReader,
    "dicom": DicomReader,
    "pil": PILReader,
    "numpy": NumpyReader,
}


def reader_for(path: PathLike, **kwargs: Any) -> ImageReader:
    """A new MONAI :class:`~monai.data.ImageReader` suited to ``path``; ``kwargs`` go to its constructor."""
    return _READERS[reader_kind(path)](**kwargs)


def _new_load_image(**kwargs: Any) -> LoadImage:
    """``LoadImage`` instantiates every MONAI reader, including the GPU DICOM codec reader that logs and warns
    on machines without nvImageCodec; keep that notice out of the output."""
    log = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
            return LoadImage(**kwargs)
    finally:
        log.setLevel(level)


class LoadMedicalImage(Transform):
    """:class:`monai.transforms.LoadImage` that picks the reader from the path and raises :class:`DataError`.

    Args:
        image_only: return only the :class:`~monai.data.MetaTensor` (its ``.meta`` holds affine, spacing, filename);
            otherwise return ``(image, meta)`` like ``LoadImage``.
        ensure_channel_first: add/move the channel dimension first (``EnsureChannelFirst``).
        dtype: output dtype (``None`` keeps the stored one).
        reader_kwargs: constructor arguments per reader kind, e.g. ``{"dicom": {"affine_lps_to_ras": False}}``.
    """

    def __init__(
        self,
        image_only: bool = True,
        ensure_channel_first: bool = False,
        dtype: Any = np.float32,
        reader_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self.loader = _new_load_image(image_only=image_only, ensure_channel_first=ensure_channel_first, dtype=dtype)
        self.reader_kwargs = {k: dict(v) for k, v in (reader_kwargs or {}).items()}
        self._readers: dict[str, ImageReader] = {}

    def __call__(self, filename: PathLike | Sequence[PathLike]):
        names = ensure_tuple(filename)
        if not names:
            raise DataError("Empty image path in the datalist entry. Give each entry an image path.")
        kinds = set()
        for name in names:
            kinds.add(reader_kind(name))
            if Path(name).is_file() and os.path.getsize(name) == 0:
                raise DataError(f"Image file '{name}' is empty (0 bytes); the copy or export failed. Re-export it.")
        if len(kinds) > 1:
            raise DataError(f"Images {names} are listed as one multi-channel input but have different formats.")
        kind = kinds.pop()
        if kind not in self._readers:
            self._readers[kind] = _READERS[kind](**self.reader_kwargs.get(kind, {}))
        shown = names[0] if len(names) == 1 else list(names)
        try:
            return self.loader(filename, reader=self._readers[kind])
        except DataError:
            raise
        except Exception as e:
            raise DataError(
                f"Image file '{shown}' cannot be read as {kind.upper()}: {type(e).__name__}: {e}. The file is "
                "probably corrupt or truncated; re-export it or remove it from the datalist."
            ) from e


class LoadMedicalImaged(MapTransform):
    """Dictionary version of :class:`LoadMedicalImage` (a drop-in for :class:`monai.transforms.LoadImaged`).

    With ``image_only=False`` the metadata is also stored under ``"{key}_{meta_key_postfix}"``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        image_only: bool = True,
        ensure_channel_first: bool = False,
        dtype: Any = np.float32,
        reader_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
        meta_key_postfix: str = "meta_dict",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_only = image_only
        self.meta_key_postfix = meta_key_postfix
        self.loader = LoadMedicalImage(image_only, ensure_channel_first, dtype, reader_kwargs)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if self.image_only:
                d[key] = self.loader(d[key])
            else:
                d[key], d[f"{key}_{self.meta_key_postfix}"] = self.loader(d[key])
        return d


def unit_axes(image: Any, count: int) -> bool:
    """Whether the last ``count`` axes of ``image`` have size 1."""
    return all(int(n) == 1 for n in image.shape[image.ndim - count :])


def drop_unit_axes(image: Any, spatial_dims: int) -> Any:
    """A channel-first ``image`` with more spatial axes than ``spatial_dims`` whose extra trailing axes have size 1
    (a 2D slice stored in NIfTI as ``(H, W, 1)``), without those axes, as a 2D file would load; any other image as it
    is. Its affine is kept (a 2D file's is 4x4 too).

    Shapes: ``(C, H, W, 1)`` -> ``(C, H, W)`` for ``spatial_dims`` 2."""
    extra = image.ndim - 1 - int(spatial_dims)
    if extra <= 0 or not unit_axes(image, extra):
        return image
    out = image[(..., *([0] * extra))]
    if isinstance(out, MetaTensor):
        out.meta[MetaKeys.SPATIAL_SHAPE] = np.asarray(out.shape[1:])
        out.spatial_ndim = int(spatial_dims)
    return out


class DropUnitAxesd(MapTransform):
    """Dictionary version of :func:`drop_unit_axes`; place it right after the loader."""

    def __init__(self, keys: KeysCollection, spatial_dims: int, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spatial_dims = int(spatial_dims)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = drop_unit_axes(d[key], self.spatial_dims)
        return d


def image_loader(keys: KeysCollection, ensure_channel_first: bool = True, **kwargs: Any) -> LoadMedicalImaged:
    """Recommended loader for bundles: ``LoadMedicalImaged(keys, ensure_channel_first=True, **kwargs)``.

    In a bundle config: ``"$medkd.data.loading.image_loader(['image', 'label'])"``.
    """
    return LoadMedicalImaged(keys, ensure_channel_first=ensure_channel_first, **kwargs)
