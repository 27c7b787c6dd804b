"""Validation and test lists held out of the training list, for a datalist that lacks them.

A Medical Segmentation Decathlon ``dataset.json`` has a ``training`` list and an unlabelled ``test`` list, and no
validation list; a CSV datalist without a ``split`` column is one list; a bundle needs labelled ``training``,
``validation`` and ``test`` lists. :func:`bundle_datalists` gives a bundle its ``datalists``: the datalist itself when
it has all three, else a **split file** made from it once (``<dataset_dir>/medkd_splits.json``): a Decathlon datalist
whose missing lists are held out of the training list (``val_fraction`` and ``test_fraction`` of the cases,
reproducibly by ``seed``, whole groups of ``group_by``, and stratified by class for classification;
:class:`SplitOptions`). The ``dataset.json`` of an nnU-Net v2 raw dataset, which lists no cases, gets its training
list from ``imagesTr`` and ``labelsTr`` (:func:`nnunet_training`). Every stage reads the same file, it can be read and
edited, and its lists are kept when the datalist's lists change (with a warning saying how to split again), as the
plan file is; its other fields (``labels``, ``modality``) follow the datalist.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from medkd.data.datalists import csv_class_names, csv_lists, load_datalist
from medkd.data.splits import Unit, group_of, group_regex, random_splits, relative
from medkd.errors import ConfigError, DataError
from medkd.runtime.distributed import rank0_first
from medkd.runtime.files import atomic_write_json, load_checkpoint

__all__ = [
    "SPLITS",
    "SPLIT_FILE",
    "SplitOptions",
    "lists_to_hold_out",
    "is_nnunet_raw",
    "nnunet_raw",
    "nnunet_training",
    "bundle_datalists",
    "make_split",
    "check_not_trained_from",
]

logger = logging.getLogger(__name__)

SPLITS = ("training", "validation", "test")
HELD_OUT = ("validation", "test")
SPLIT_KEY = "medkd_split"
SPLIT_FILE = "medkd_splits.json"  # the bundles' split_file, in their dataset_dir
_STAMPED = re.compile(r"\.\d{8}-\d{6}(-\d+)?\.pt$")  # a checkpoint set aside (previous.set_aside)


@dataclass(frozen=True)
class SplitOptions:
    """How the missing lists are held out of the training list (the bundles' ``split_options``).

    Attributes:
        val_fraction, test_fraction: fractions of the training cases held out for each missing list.
        seed: seed of the random choice.
        group_by: a regular expression searched in each image's path (relative to the datalist's folder); cases with
            the same match (its first group when it has one), e.g. one patient's, stay in one list.
        group_field: instead, a field of each entry (a CSV column, e.g. ``patient``) whose value keeps cases together.

    Raises:
        ConfigError: fractions outside ``[0, 1)`` or that leave no training cases; both ``group_by`` and
            ``group_field``.
    """

    val_fraction: float = 0.2
    test_fraction: float = 0.2
    seed: int = 0
    group_by: str | None = None
    group_field: str | None = None

    def __post_init__(self) -> None:
        if self.group_by and self.group_field:
            raise ConfigError(
                "split_options takes group_by (a path pattern) or group_field (an entry field), not both."
            )
        v, t = self.val_fraction, self.test_fraction
        if not 0 <= v < 1 or not 0 <= t < 1 or v + t >= 1:
            raise ConfigError(
                f"split_options val_fraction {v} and test_fraction {t} must each be in [0, 1) and leave cases for "
                "training (their sum below 1)."
            )

    @classmethod
    def of(cls, options: Mapping[str, Any]) -> SplitOptions:
        """The options of a ``split_options`` mapping; an unknown key raises :class:`ConfigError` naming the known."""
        known = [f.name for f in fields(cls)]
        if unknown := sorted(set(options) - set(known)):
            raise ConfigError(f"split_options has no {', '.join(unknown)}; its keys are {', '.join(known)}.")
        return cls(**options)


def _lists_sha256(source: Path, data: Mapping[str, Any]) -> str:
    """A hash of a datalist's lists, or of an nnU-Net dataset's label file names (the other fields of a datalist, such
    as ``labels``, may change without a new split)."""
    lists = {k: data.get(k) for k in SPLITS}
    if is_nnunet_raw(data):
        lists["training"] = sorted(p.name for p in (source.parent / "labelsTr").glob(f"*{data['file_ending']}"))
    return hashlib.sha256(json.dumps(lists, sort_keys=True).encode()).hexdigest()


def _fields(data: Mapping[str, Any]) -> dict[str, Any]:
    """A datalist's fields but its lists and the split record (``labels``, ``modality``, ``name``, ...)."""
    return {k: v for k, v in data.items() if k not in SPLITS and k != SPLIT_KEY}


def _source_data(source: Path) -> dict[str, Any]:
    """A datalist's content as a JSON datalist's object: a CSV datalist's lists (:func:`csv_lists`), with paths
    relative to its folder as in a JSON datalist, and no other field but, where its labels are class names, the
    ``labels`` map numbering them (:func:`csv_class_names`)."""
    if source.suffix.lower() != ".csv":
        return json.loads(source.read_text())
    names = csv_class_names(source)
    lists = {
        key: [_named(_relative(e, source.parent), names) for e in load_datalist(source, key)]
        for key in csv_lists(source)
    }
    return {"labels": {str(i): name for i, name in enumerate(names)}, **lists} if names else lists


def _named(entry: Mapping[str, Any], names: Sequence[str] | None) -> dict[str, Any]:
    """``entry`` with its class index written as the class's name (of ``names``), which the bundles read back by
    their ``class_names`` (:func:`medkd.data.loading.load_datalist`): the split file keeps a CSV file's class names."""
    entry = dict(entry)
    if names and isinstance(entry.get("label"), int):
        entry["label"] = names[entry["label"]]
    return entry


def lists_to_hold_out(datalist_file: str | os.PathLike) -> list[str]:
    """The lists of ``validation`` and ``test`` that a JSON or CSV datalist lacks: absent, empty, or without labels (a
    Decathlon ``test`` list; a CSV file without a ``split`` column has a training list only). ``[]`` for a file that
    is not a readable datalist with a labelled ``training`` list (a missing or broken file, no labelled training
    cases: the bundles' own checks report those), or the ``dataset.json`` of an nnU-Net v2 raw dataset
    (:func:`nnunet_training`)."""
    path = Path(datalist_file)
    if path.suffix.lower() not in (".json", ".csv") or not path.is_file():
        return []
    try:
        data = _source_data(path)
    except (OSError, ValueError):  # DataError is a ValueError
        return []
    if is_nnunet_raw(data):
        return list(HELD_OUT)

    def labelled(entries: Any) -> bool:
        return isinstance(entries, list) and any(isinstance(e, dict) and "label" in e for e in entries)

    if not isinstance(data, dict) or not labelled(data.get("training")):
        return []
    return [key for key in HELD_OUT if not labelled(data.get(key))]


def nnunet_raw(path: str | os.PathLike) -> dict[str, Any] | None:
    """The content of ``path`` where it is the ``dataset.json`` of an nnU-Net v2 raw dataset (:func:`is_nnunet_raw`),
    else ``None``, also for a file that cannot be read (the datalist loaders name that)."""
    path = Path(path)
    if path.suffix.lower() != ".json":
        return None
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return content if is_nnunet_raw(content) else None


def is_nnunet_raw(data: Any) -> bool:
    """Whether ``data`` (a ``dataset.json``'s content) is an nnU-Net v2 raw dataset's, which lists no cases."""
    return (
        isinstance(data, Mapping)
        and "training" not in data
        and isinstance(data.get("file_ending"), str)
        and isinstance(data.get("channel_names"), dict)
    )


def nnunet_training(root: str | os.PathLike, data: Mapping[str, Any]) -> list[dict]:
    """The training cases of an nnU-Net v2 raw dataset in ``root``, whose ``dataset.json`` (``data``) lists none:
    each label map ``labelsTr/<case><file_ending>`` with its images ``imagesTr/<case>_<XXXX><file_ending>``, one per
    entry of ``channel_names`` (a list of files when there are several).

    Raises:
        DataError: no label map, or a case whose image of a channel is missing.
    """
    root, ending, channels = Path(root), data["file_ending"], sorted(data["channel_names"], key=int)
    entries = []
    for label in sorted((root / "labelsTr").glob(f"*{ending}")):
        case = label.name[: -len(ending)]
        images = [root / "imagesTr" / f"{case}_{int(c):04d}{ending}" for c in channels]
        if missing := [str(p) for p in images if not p.is_file()]:
            raise DataError(f"the nnU-Net dataset {root}: case {case!r} has no image {', '.join(missing)}.")
        entries.append({"image": [str(p) for p in images] if len(images) > 1 else str(images[0]), "label": str(label)})
    if not entries:
        raise DataError(f"the nnU-Net dataset {root} has no label map labelsTr/*{ending}.")
    return entries


def bundle_datalists(
    datalist_file: str | os.PathLike,
    split_file: str | os.PathLike,
    task: str = "segmentation",
    trained_in: str | os.PathLike | None = None,
    resume: bool = True,
    **split_options: Any,
) -> dict[str, str]:
    """A bundle's ``datalists`` (``{"training": file, "validation": file, "test": file}``): ``datalist_file`` when it
    has labelled validation and test lists, else ``split_file``, made by :func:`make_split` when missing (by rank 0
    in a ``torchrun`` run; the other processes then read it). An existing split file's lists are used as they are
    (with a warning when the datalist's lists or the options changed since); its other fields (``labels``,
    ``modality``, ...) are copied from the datalist again when they changed there.

    Args:
        datalist_file: the bundle's datalist (a Decathlon JSON or a CSV file).
        split_file: where the split is kept (the bundle's ``split_file``).
        task: ``"segmentation"``, or ``"classification"`` (held out class by class).
        trained_in: a checkpoint folder (the bundle's ``ckpt_dir``): a split is not made from a datalist whose
            training list trained a network there (:func:`check_not_trained_from`), unless the run starts afresh.
        resume: the bundle's ``resume``; ``False`` (a fresh start, which sets those checkpoints aside) splits anyway.
        split_options: the fields of :class:`SplitOptions` (the bundle's ``split_options``).
    """
    options = SplitOptions.of(split_options)
    if not lists_to_hold_out(datalist_file):
        return dict.fromkeys(SPLITS, str(datalist_file))
    path = Path(split_file).expanduser()
    with rank0_first():
        if path.is_file():
            _refresh(path, Path(datalist_file), options)
        else:
            check_not_trained_from(datalist_file, trained_in if resume else None)
            make_split(datalist_file, path, task=task, options=options)
    return dict.fromkeys(SPLITS, str(path))


def check_not_trained_from(datalist_file: str | os.PathLike, ckpt_dir: str | os.PathLike | None) -> None:
    """Raise :class:`ConfigError` when a checkpoint in ``ckpt_dir`` was trained on the training list of
    ``datalist_file``, as its run fingerprint records: lists held out of that list now (e.g. its test list was replaced
    by unlabelled images) would hold images those networks learnt from. Checkpoints set aside with a timestamp, or
    without a record, are passed over."""
    if ckpt_dir is None:
        return
    source = str(Path(datalist_file).expanduser().resolve())
    for path in sorted(Path(ckpt_dir).glob("*.pt")):
        if _STAMPED.search(path.name):
            continue
        data = (load_checkpoint(path).get("fingerprint") or {}).get("data") or {}
        if (data.get("training") or {}).get("file") == source:
            raise ConfigError(
                f"the datalist {source} now lacks labelled {' and '.join(lists_to_hold_out(source))} lists, and "
                f"checkpoint {path} was trained on its training list: lists held out of it would hold that network's "
                "training images. Give labelled lists again (or --datalists with a test list of other images), or "
                "train afresh on a new split (--resume False, or other folders: --bundle_root)."
            )


def _refresh(path: Path, source: Path, options: SplitOptions) -> None:
    """Copy the datalist's fields into the split file again where they changed; warn where the lists or options did."""
    try:
        split = json.loads(path.read_text())
        made = split.get(SPLIT_KEY, {})
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(
            f"the split file {path} is not a JSON datalist ({e}); fix it, or delete it to split {source} again."
        ) from e
    data = _source_data(source)
    if _fields(split) != _fields(data):
        kept = {k: v for k, v in split.items() if k not in _fields(split)}
        _write(path, {**_fields(data), **kept})
        logger.info("the split file %s has the fields of %s again (%s)", path, source, ", ".join(_fields(data)))
    changed = [f"{k} {made.get(k)} → {v}" for k, v in asdict(options).items() if made.get(k) != v]
    if made.get("source_lists_sha256") != _lists_sha256(source, data):
        changed.insert(0, f"the lists of {source}")
    if changed:
        logger.warning(
            "the split file %s was made before these changed: %s; it is used as it is. Delete it to split again.",
            path,
            ", ".join(changed),
        )


def make_split(
    datalist_file: str | os.PathLike,
    split_file: str | os.PathLike,
    task: str = "segmentation",
    options: SplitOptions | None = None,
) -> Path:
    """Write ``split_file``: the datalist with the validation and test lists it lacks (:func:`lists_to_hold_out`)
    held out of its training list; labelled lists it has are kept. Every other field (``labels``, ``modality``, ...)
    is copied; in a split file beside the datalist, paths under its folder are relative to it (as the bundles read them,
    from ``dataset_dir``), elsewhere absolute; ``medkd_split`` records the source, a hash of its lists, the
    options and the counts.

    Args:
        datalist_file: a Decathlon JSON datalist, or a CSV datalist.
        split_file: the file to write.
        task: ``"classification"`` holds out the same fraction of each class.
        options: how (:class:`SplitOptions`; default its defaults).

    Raises:
        DataError: too few training cases to hold out every missing list, or a ``group_by`` that matches nothing.
    """
    options = options or SplitOptions()
    source, path = Path(datalist_file).expanduser().resolve(), Path(split_file).expanduser()
    data = _source_data(source)
    missing = lists_to_hold_out(source)
    training = load_datalist(source, key="training") if "training" in data else nnunet_training(source.parent, data)
    lists = _hold_out(source, training, missing, task, options)
    split = _fields(data)
    split[SPLIT_KEY] = {
        "source": str(source),
        "source_lists_sha256": _lists_sha256(source, data),
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "held_out": missing,
        **asdict(options),
        "counts": {key: len(lists[key]) for key in SPLITS},
    }
    beside = path.parent.resolve() == source.parent  # paths relative to the datalist's folder stay relative
    names = csv_class_names(source) if source.suffix.lower() == ".csv" else None
    split.update(
        {key: [_named(_relative(e, source.parent) if beside else e, names) for e in lists[key]] for key in SPLITS}
    )
    _write(path, split)
    counts = ", ".join(f"{key} {len(lists[key])}" for key in SPLITS)
    logger.info(
        "%s held out of the training list of %s (seed %d): %s; written to %s (edit it, or delete it to split again)",
        " and ".join(missing),
        source,
        options.seed,
        counts,
        path,
    )
    return path


def _hold_out(
    source: Path, training: list[dict], missing: Sequence[str], task: str, options: SplitOptions
) -> dict[str, list[dict]]:
    """The ``training``, ``validation`` and ``test`` lists: the ``missing`` lists held out of ``training`` in whole
    groups (:func:`_groups`), the others read from ``source``."""
    given = {"validation": options.val_fraction, "test": options.test_fraction}
    fractions = {key: given[key] if key in missing else 0.0 for key in HELD_OUT}
    members: dict[str, list[int]] = defaultdict(list)
    strata: dict[str, str | None] = {}
    for i, (entry, group) in enumerate(zip(training, _groups(source, training, options), strict=True)):
        members[group].append(i)
        strata[group] = str(entry.get("label")) if task == "classification" else None
    units = [Unit(g, strata[g], len(idx)) for g, idx in sorted(members.items())]
    assigned = random_splits(units, fractions["validation"], fractions["test"], options.seed)
    lists: dict[str, list[dict]] = {key: [] for key in SPLITS}
    for group, indices in sorted(members.items()):
        lists[assigned[group]] += [training[i] for i in indices]
    for key in HELD_OUT:
        if key not in missing:
            lists[key] = load_datalist(source, key=key)
    if empty := [key for key in SPLITS if not lists[key]]:
        raise DataError(
            f"the datalist {source} has {len(units)} training case(s) (groups), too few to hold out "
            f"{' and '.join(missing)} lists and keep cases for training ({', '.join(empty)} would be empty); add "
            "cases, or give the lists yourself (--datalists \"{'training': ..., 'validation': ..., 'test': ...}\")."
        )
    return lists


def _groups(source: Path, training: Sequence[Mapping[str, Any]], options: SplitOptions) -> list[str]:
    """The group of each training entry, whose cases stay in one list: its ``group_field`` value, or what
    ``group_by`` matches in its (first) image's path relative to the datalist's folder (the path itself without)."""
    regex = group_regex(options.group_by, option="split_options group_by")
    groups = []
    for entry in training:
        image = entry["image"][0] if isinstance(entry["image"], list | tuple) else entry["image"]
        name = os.path.relpath(image, source.parent) if os.path.isabs(image) else str(image)
        if options.group_field:
            if entry.get(options.group_field) in (None, ""):
                raise DataError(
                    f"split_options group_field {options.group_field!r}: the training entry of {name!r} in {source} "
                    f"has no such field (fields: {sorted(entry)})."
                )
            groups.append(f"{options.group_field}={entry[options.group_field]}")
            continue
        if (group := group_of(name, regex)) is None:
            raise DataError(f"split_options group_by {options.group_by!r} matches nothing in the image path {name!r}.")
        groups.append(group)
    return groups


def _write(path: Path, split: Mapping[str, Any]) -> None:
    """Write the split file atomically, or raise :class:`ConfigError` naming the bundle key that names it."""
    try:
        atomic_write_json(path, split, default=str)
    except OSError as e:
        raise ConfigError(
            f"cannot write {path} ({e}); pass --split_file a writable path (e.g. in the bundle's folder)."
        ) from e


def _relative(entry: Mapping[str, Any], root: Path) -> dict[str, Any]:
    """``entry`` with each path under ``root`` relative to it (the split file beside the datalist then moves with its
    data)."""

    def rel(value: Any) -> Any:
        if isinstance(value, list):
            return [rel(v) for v in value]
        return relative(value, root) if isinstance(value, str) else value

    return {k: rel(v) if k in ("image", "label") else v for k, v in entry.items()}
