"""Loading and saving weights with clear errors, atomically."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from medkd.bundles import checkpoint_file
from medkd.runtime.distributed import unwrap
from medkd.runtime.files import CheckpointError, atomic_torch_save, load_checkpoint
from medkd.training.run_fingerprint import INPUT_KEYS, fingerprint_changes, image_ids

__all__ = [
    "load_network_weights",
    "check_trained_inputs",
    "trained_files",
    "save_or_explain",
    "check_trained_data",
    "check_not_trained_on",
]

_NETWORK_KEYS = ("network", "model", "state_dict", "teacher")


def load_network_weights(
    network: nn.Module, path: str | os.PathLike, map_location: Any = "cpu", role: str = ""
) -> None:
    """Load a network's weights from ``path``: a state dict (as MONAI's ``CheckpointSaver`` writes for one
    network, possibly with its ``checkpointer`` state), or a dict holding one under ``role`` or one of
    ``network``/``model``/``state_dict``/``teacher``."""
    obj = load_checkpoint(path, map_location)
    for key in (role, *_NETWORK_KEYS):
        if key and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    obj = {k: v for k, v in obj.items() if k != "checkpointer"}  # ignite's saver state, kept beside the weights
    target = unwrap(network)
    try:
        target.load_state_dict(obj)
    except RuntimeError as e:
        lines = [_cut(line.strip()) for line in str(e).splitlines()[1:] if line.strip()]
        shown = "; ".join(lines[:3]) + (f"; and {len(lines) - 3} more" if len(lines) > 3 else "")
        raise CheckpointError(
            f"checkpoint {path} does not match the {role or 'network'} ({type(target).__name__}): {shown or e}. It "
            "was trained with other network settings (e.g. for another data set's plan: teacher_channels, "
            "student_channels, in_channels, classes): use the settings it was trained with (its settings_*.json "
            "beside it), or train this network for these settings in other folders (--bundle_root)."
        ) from e


def _cut(line: str, limit: int = 240) -> str:
    """``line`` cut to ``limit`` characters (torch lists every missing key of a state dict on one line)."""
    return line if len(line) <= limit else line[:limit] + " ..."


def check_trained_inputs(
    checkpoints: str | os.PathLike | Mapping[str, str | os.PathLike | None] | None, inputs: Mapping[str, Any]
) -> None:
    """Raise :class:`CheckpointError` when a checkpoint was trained on other inputs than ``inputs`` (the settings that
    define them, :func:`medkd.training.run_fingerprint.input_settings`: spacing, normalisation, channels, strides,
    a classifier's image size), as its run fingerprint records them; its weights would load, and then score inputs
    unlike those it learnt from. The message lists what changed and the overrides that give the trained settings back.

    ``checkpoints``: a checkpoint file, or files by network name; a missing file, ``None`` (nothing to load) or a
    checkpoint without a record (made by an earlier medkd, or outside medkd) is passed over.
    """
    files = checkpoints if isinstance(checkpoints, Mapping) else {"network": checkpoints}
    for name, path in files.items():
        if path is None or not Path(path).is_file():
            continue
        trained = (load_checkpoint(path).get("fingerprint") or {}).get("inputs")
        if trained is None or (changes := fingerprint_changes({"inputs": trained}, {"inputs": dict(inputs)})) == []:
            continue
        if kind := _other_kind(trained, inputs):
            raise CheckpointError(
                f"checkpoint {path} ({name}) is {kind}: it is another bundle's or data set's. Point --ckpt_dir (or "
                "--bundle_root) at checkpoints this bundle trained on this data, or train them here."
            )
        back = " ".join(f"--{k} '{json.dumps(v)}'" for k, v in trained.items() if k in inputs and inputs[k] != v)
        raise CheckpointError(
            f"checkpoint {path} ({name}) was trained on other inputs than this run gives it: "
            f"{'; '.join(c.removeprefix('inputs ') for c in changes)}. Run with the settings it was trained with "
            f"({back + ', or ' if back else ''}the plan file it was trained with), or train it for these settings in "
            "other folders (--bundle_root)."
        )


def _other_kind(trained: Mapping[str, Any], inputs: Mapping[str, Any]) -> str | None:
    """How a checkpoint's recorded inputs differ in kind from this run's (another task, images of other dimensions),
    where no setting could give them back; ``None`` when they differ only in settings."""
    tasks = [
        next((t for t, keys in INPUT_KEYS.items() if set(keys) <= set(record)), None) for record in (trained, inputs)
    ]
    if None not in tasks and tasks[0] != tasks[1]:
        return f"a {tasks[0]} network, not a {tasks[1]} one"
    dims = [len(str(record.get("axcodes", ""))) for record in (trained, inputs)]
    if all(dims) and dims[0] != dims[1]:
        return f"a network of {dims[0]}D images, not {dims[1]}D ones"
    return None


def trained_files(load_dir: str | os.PathLike, networks: Iterable[str]) -> dict[str, Path]:
    """The checkpoint file of each of ``networks`` (names, or a mapping by name) in ``load_dir``, as
    :class:`~medkd.training.handlers.BestCheckpoints` names them; for :func:`check_trained_inputs`."""
    return {name: Path(load_dir) / checkpoint_file(name) for name in networks}


def save_or_explain(obj: Any, path: str | os.PathLike) -> None:
    """:func:`medkd.runtime.files.atomic_torch_save`, turning a failed write (full disk, no permission) into a
    :class:`CheckpointError` that says the previous file is intact and what to do."""
    try:
        atomic_torch_save(obj, path)
    except OSError as e:
        kept = f"the previous {path} is intact" if Path(path).exists() else f"no earlier {path} existed"
        raise CheckpointError(
            f"could not write checkpoint {path} ({e.strerror or e}); {kept}. Free disk space (or fix permissions) "
            "and run the same command again to resume."
        ) from e


def _trained_images(path: str | os.PathLike | None) -> set[str] | None:
    """The ids of the training images a checkpoint's fingerprint records
    (:func:`medkd.training.run_fingerprint.image_ids`); ``None`` for a missing file or one without that record."""
    if path is None or not Path(path).is_file():
        return None
    trained = (load_checkpoint(path).get("fingerprint") or {}).get("training_images")
    return None if trained is None else set(trained)


def check_trained_data(
    checkpoint: str | os.PathLike | None, training: Iterable[Mapping[str, Any]], allow: bool = False
) -> None:
    """Raise :class:`CheckpointError` when ``checkpoint`` (a frozen teacher's) was trained on other training images
    than ``training`` (this run's training list), unless ``allow`` (the bundles' ``allow_other_teacher_data``). A
    missing file, ``None`` or a checkpoint without the record (an earlier medkd) is passed over."""
    trained = _trained_images(checkpoint)
    if allow or trained is None or trained == (ids := set(image_ids(training))):
        return
    raise CheckpointError(
        f"checkpoint {checkpoint} (teacher) was trained on other training images than this run's "
        f"({len(trained - ids)} of its {len(trained)} are not in this training list, {len(ids - trained)} of this "
        "list's are new to it), so it would teach what it learnt from other data. Train the teacher on these data "
        "first (the train_teacher stage, or --bundle_root for other folders), or --allow_other_teacher_data True to "
        "distil from it anyway."
    )


def check_not_trained_on(
    checkpoints: Mapping[str, str | os.PathLike | None],
    items: Iterable[Mapping[str, Any]],
    allow: bool = False,
    input_dir: str | os.PathLike | None = None,
) -> None:
    """Raise :class:`CheckpointError` when an image of ``items`` (the test list) is one a checkpoint of
    ``checkpoints`` (files by network name) was trained on, as its fingerprint records, unless ``allow`` (the bundles'
    ``allow_leakage``); checkpoints without the record (an earlier medkd) are passed over. Items of an inference's
    ``input_dir`` (not ``None``) are images to segment or classify, not a test list: passed over."""
    if input_dir is not None:
        return
    items = list(items)
    ids = image_ids(items)
    for name, path in checkpoints.items():
        trained = _trained_images(path)
        if allow or not trained or not (shared := [i for i, x in enumerate(ids) if x in trained]):
            continue
        first = items[shared[0]]["image"]
        raise CheckpointError(
            f"{len(shared)} image(s) of the test list (e.g. {first}) were in the training list of checkpoint {path} "
            f"({name}): scores on them would overstate it. Give a test list of other images (e.g. the labelled test "
            "list the networks were trained beside), or --allow_leakage True to run anyway."
        )
