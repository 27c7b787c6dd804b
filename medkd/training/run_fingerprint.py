"""Run fingerprints: what made a run, so that a resumed run is known to be the same run.

A fingerprint is a JSON-able dict: the data lists (path and a hash of the file's bytes; images are not read), the
networks (class, parameter count, a hash of the state-dict shapes), the routes with their weights and temperatures
(and the preset they form), the teacher's role (``teacher_mode``, ``teacher_init``), the batches' mixing (``mix``),
the class names, the label maps' value of each class where it is not the class index, the seed, and a short id of
each training image (:func:`image_ids`), so that a teacher trained on other images, or a test list holding training
images, is known.
:class:`medkd.training.handlers.ResumeCheckpoint` stores it in the resume checkpoint and refuses to resume a run whose
fingerprint differs, listing :func:`fingerprint_changes`; ``python -m medkd compare`` keeps one of its own in
``fingerprint.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from medkd.bundles import TEACHER
from medkd.knowledge.routes import PRESETS, Route, parse_routes, preset_routes
from medkd.runtime.distributed import unwrap

__all__ = [
    "run_fingerprint",
    "datalist_digest",
    "describe_network",
    "fingerprint_changes",
    "input_settings",
    "image_ids",
    "INPUT_KEYS",
]

PathLike = str | os.PathLike
_UNSET = "(not set)"
# what a fingerprint written before a key existed meant by its absence
_IMPLIED = {"teacher_mode": "frozen", "teacher_init": "checkpoint", "label_values": "the class indices"}


def _sha256(path: Path) -> str | None:
    if not path.is_file():
        return None  # the run's own loading of the list reports a missing file
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def datalist_digest(
    datalist: PathLike | Mapping[str, PathLike], keys: Sequence[str] = ("training", "validation")
) -> dict[str, dict[str, str | None]]:
    """``{key: {"file": absolute path, "sha256": hash of its bytes}}`` for each list ``key`` a run reads.

    Args:
        datalist: one datalist file holding every key, or a file per key (e.g. a bundle's ``datalists``).
        keys: the lists the run uses; keys absent from a mapping are left out.
    """
    if isinstance(datalist, Mapping):
        files = {k: datalist[k] for k in keys if k in datalist}
    else:
        files = dict.fromkeys(keys, datalist)
    paths = {k: Path(f).expanduser().resolve() for k, f in files.items()}
    hashes = {p: _sha256(p) for p in set(paths.values())}
    return {k: {"file": str(p), "sha256": hashes[p]} for k, p in paths.items()}


def _file_key(path: Path, head: int = 1 << 16) -> bytes:
    """A file's name, size and first ``head`` bytes (a folder's or a missing file's name alone): the same for the
    same image moved or copied to another folder, cheap for large volumes."""
    if not path.is_file():
        return path.name.encode()
    with path.open("rb") as f:
        return b"%s:%d:%s" % (path.name.encode(), path.stat().st_size, f.read(head))


def image_ids(entries: Iterable[Mapping[str, Any]]) -> list[str]:
    """A short id of each entry's image (16 hex digits of a SHA-256 of its file name, size and first 64 KiB; of each
    channel's file for a multi-channel image), the same wherever the data folder is: what a fingerprint records of a
    training list, compactly."""

    def one(image: Any) -> str:
        paths = image if isinstance(image, list | tuple) else [image]
        return hashlib.sha256(b"|".join(_file_key(Path(p).expanduser()) for p in paths)).hexdigest()[:16]

    return [one(entry["image"]) for entry in entries]


def describe_network(network: nn.Module) -> dict[str, Any]:
    """A stable description of a network's architecture (not its weights): class name, parameter count and a hash
    of its sorted state-dict shapes. DDP-wrapped networks are described unwrapped."""
    network = unwrap(network)
    shapes = sorted((k, list(v.shape)) for k, v in network.state_dict().items())
    return {
        "class": type(network).__name__,
        "parameters": sum(p.numel() for p in network.parameters()),
        "shapes": hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16],
    }


def _route_graph(routes: Sequence[Route], students: Sequence[str]) -> str:
    """The preset whose routes have the same names (weights aside) as ``routes``, else ``"custom"``."""
    names = sorted(r.name for r in routes)
    for preset in PRESETS:
        try:
            if sorted(r.name for r in preset_routes(preset, students)) == names:
                return preset
        except ValueError:  # e.g. diversified with other than two students
            continue
    return "custom"


# the planned settings that define what a network's input is (its channels, grid, intensities) and how it is built
# beyond its layer shapes: a checkpoint is only good for inputs made with the same ones
INPUT_KEYS = {
    "segmentation": ("in_channels", "pixdim", "normalization", "strides"),
    "classification": ("in_channels", "patch_size", "normalization"),
}


def input_settings(settings: Mapping[str, Any], task: str, **extra: Any) -> dict[str, Any]:
    """The settings of ``settings`` (a bundle's ``plan_used``) that define the networks' inputs for ``task``
    (:data:`INPUT_KEYS`; a classifier's ``patch_size`` is the size every image is resized to), with ``extra`` ones
    (``axcodes``), as JSON values: recorded in a run's fingerprint and compared when a checkpoint is used
    (:func:`medkd.training.checkpoints.check_trained_inputs`)."""
    chosen = {key: settings[key] for key in INPUT_KEYS[task] if key in settings}
    return json.loads(json.dumps({**chosen, **extra}, default=str))


def run_fingerprint(
    datalist: PathLike | Mapping[str, PathLike],
    networks: Mapping[str, nn.Module],
    routes: str | Sequence[Route | Mapping] | None = None,
    class_names: Sequence[str] | None = None,
    seed: int | None = None,
    teacher_mode: str | None = None,
    teacher_init: str | None = None,
    label_values: Sequence[int] | None = None,
    inputs: Mapping[str, Any] | None = None,
    mixing: Any = None,
    training_images: Iterable[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The fingerprint of a training run (see the module docstring).

    Args:
        datalist: the datalist file, or a file per list key (training and validation are fingerprinted).
        networks: the networks by name (teacher and students, or the teacher alone for the teacher stage).
        routes: the distillation routes (a preset name or routes); ``None`` for a run without routes.
        class_names: the class names.
        seed: the random seed.
        teacher_mode: ``"frozen"`` or ``"online"`` (see :mod:`medkd.knowledge.teacher`); ``None`` for a run without a
            teacher role (the teacher stage).
        teacher_init: ``"checkpoint"`` or ``"scratch"``; ``None`` as for ``teacher_mode``.
        label_values: the value of each class in the label maps (:mod:`medkd.data.labels`); recorded only where it is
            not ``0..N-1``, so that the fingerprints of runs made before label values existed stay the same.
        inputs: the settings that define the networks' inputs (:func:`input_settings`).
        mixing: the distillation batches' :class:`~medkd.training.mixing.BatchMixer`, recorded by
            :meth:`~medkd.training.mixing.BatchMixer.settings`; ``None`` (no mixing) records nothing.
        training_images: the training list's entries (their :func:`image_ids` are recorded, sorted).
    """
    fingerprint: dict[str, Any] = {
        "data": datalist_digest(datalist),
        "networks": {name: describe_network(net) for name, net in networks.items()},
    }
    if routes is not None:
        students = [name for name in networks if name != TEACHER]
        parsed = parse_routes(routes, students)
        fingerprint["route_graph"] = _route_graph(parsed, students)
        fingerprint["routes"] = [r.to_dict() for r in parsed]
    if class_names is not None:
        fingerprint["class_names"] = list(class_names)
    if label_values is not None and list(label_values) != list(range(len(label_values))):
        fingerprint["label_values"] = [int(v) for v in label_values]
    if seed is not None:
        fingerprint["seed"] = seed
    for key, value in (("teacher_mode", teacher_mode), ("teacher_init", teacher_init)):
        if value is not None:
            fingerprint[key] = value
    if inputs is not None:
        fingerprint["inputs"] = dict(inputs)
    if mixing is not None:
        fingerprint["mixing"] = mixing.settings()
    if training_images is not None:
        fingerprint["training_images"] = sorted(image_ids(training_images))
    return json.loads(json.dumps(fingerprint, default=str))  # tuples to lists: equal to itself after a round trip


def _data_changes(old: Mapping, new: Mapping) -> list[str]:
    changes = []
    for key in dict.fromkeys([*old, *new]):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if a is None or b is None:
            changes.append(f"{key} data list {'added' if a is None else 'removed'}")
        elif a["file"] != b["file"]:
            changes.append(f"data list {a['file']} → {b['file']}")
        else:
            changes.append(f"data list {b['file']} content changed")
    return changes


def _network_changes(old: Mapping, new: Mapping) -> list[str]:
    changes = [f"networks: {', '.join(old)} → {', '.join(new)}"] if list(old) != list(new) else []
    for name in (n for n in new if n in old and old[n] != new[n]):
        a, b = old[name], new[name]
        if a["class"] != b["class"]:
            changes.append(f"network {name}: {a['class']} → {b['class']}")
        elif a["parameters"] != b["parameters"]:
            changes.append(f"network {name}: {a['parameters']} → {b['parameters']} parameters")
        else:
            changes.append(f"network {name}: layer shapes changed")
    return changes


def _route_changes(old: Sequence[Mapping], new: Sequence[Mapping]) -> list[str]:
    def by_name(routes: Sequence[Mapping]) -> dict[str, Mapping]:
        return {f"{r['target']}/{r['kind']}_from_{r['source']}": r for r in routes}

    a, b = by_name(old), by_name(new)
    changes = []
    if removed := [n for n in a if n not in b]:
        changes.append(f"routes removed: {', '.join(removed)}")
    if added := [n for n in b if n not in a]:
        changes.append(f"routes added: {', '.join(added)}")
    for name in (n for n in b if n in a and a[n] != b[n]):
        fields = [f"{k} {a[name].get(k)} → {b[name].get(k)}" for k in b[name] if a[name].get(k) != b[name].get(k)]
        changes.append(f"route {name}: {', '.join(fields)}")
    return changes


def fingerprint_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What differs from fingerprint ``old`` to ``new``, one line each (e.g. ``"routes: diversified → kd"``,
    ``"data list /x/dataset.json content changed"``, ``"seed 0 → 1"``); empty when they are equal."""
    changes: list[str] = []
    for key in dict.fromkeys([*old, *new]):
        if key == "training_images":  # what the data lists' hashes already tell, image by image
            continue
        a, b = old.get(key, _IMPLIED.get(key)), new.get(key, _IMPLIED.get(key))
        if a == b or (key == "inputs" and (a is None or b is None)):  # runs made before inputs were recorded
            continue
        if key == "route_graph":
            changes.append(f"routes: {a} → {b}")
        elif key == "routes":
            if old.get("route_graph") == new.get("route_graph"):  # same graph: which weights, temperatures, ...
                changes += _route_changes(a or [], b or [])
        elif key == "data":
            changes += _data_changes(a or {}, b or {})
        elif key == "networks":
            changes += _network_changes(a or {}, b or {})
        elif isinstance(a, Mapping) and isinstance(b, Mapping):
            for k in (k for k in dict.fromkeys([*a, *b]) if a.get(k, _UNSET) != b.get(k, _UNSET)):
                changes.append(f"{key} {k}: {a.get(k, _UNSET)} → {b.get(k, _UNSET)}")
        else:
            changes.append(f"{key.replace('_', ' ')} {a} → {b}")
    return list(dict.fromkeys(changes))
