"""A bundle's config checked as a whole before any work: the keys of every file, the values given on the command line,
the classes named by ``_target_`` and the lengths of the lists that must agree.

MONAI merges the config files, an ``--args_file`` and the command line without a word about a key that nothing reads
(``"kd_wieght": 0.5`` in an edited ``train.json``), reads ``--amp false`` as the text ``"false"`` (which is true), and
reports a deleted key or a misspelt class deep inside a traceback; each check here turns one of these into a
:class:`medkd.errors.ConfigError` naming the file or key, what is wrong and the fix.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pydoc import locate
from typing import Any

from monai.bundle import ConfigParser
from monai.bundle.config_item import ComponentLocator
from monai.bundle.reference_resolver import ReferenceResolver
from monai.bundle.utils import ID_SEP_KEY, MACRO_KEY, MERGE_KEY

from medkd.bundles import known_keys
from medkd.errors import ConfigError, json_error

__all__ = [
    "read_config_file",
    "references",
    "check_config_keys",
    "check_override_values",
    "check_targets",
    "check_lengths",
]

# keys whose value must be at least this number (an int key must also be an int)
AT_LEAST = {"max_epochs": 1, "batch_size": 1, "val_interval": 1}
# keys whose value must be a number above 0
POSITIVE = {"learning_rate", "temperature"}


def read_config_file(path: str | os.PathLike) -> dict:
    """The content of a JSON or YAML config file, as MONAI reads it, or a :class:`ConfigError` naming the file and
    the line and column of a JSON syntax error (``json`` names the position only)."""
    try:
        return ConfigParser.load_config_file(str(path))
    except json.JSONDecodeError as error:
        raise json_error(path, error) from error


def _top(ref: str) -> str:
    """The top-level key of an id or a file's key (``train#trainer`` → ``train``; a ``+`` merge key → its key)."""
    return ref.replace("#", ID_SEP_KEY).split(ID_SEP_KEY)[0].removeprefix(MERGE_KEY)


def _strings(node: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """(id, text) of every string in a config, ids as MONAI writes them (``train#trainer#max_epochs``)."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            yield from _strings(value, f"{where}#{key}" if where else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _strings(value, f"{where}#{i}")
    elif isinstance(node, str):
        yield where, node


def references(config: Any) -> dict[str, str]:
    """The top-level keys that ``config`` refers to (``@key...`` in values and expressions, ``%key`` macros of the
    same config), each with the id of the first value that refers to it."""
    found: dict[str, str] = {}
    for where, text in _strings(config):
        refs = [_top(ref) for ref in ReferenceResolver.match_refs_pattern(text)]
        if text.startswith(MACRO_KEY):
            path, ids = ConfigParser.split_path_id(text[len(MACRO_KEY) :])
            refs += [_top(ids)] if not path else []
        for ref in refs:
            found.setdefault(ref, where)
    return found


def _nearest(key: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(names), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_config_keys(config_files: Sequence[str | os.PathLike], overrides: Mapping[str, Any] | None = None) -> None:
    """Raise :class:`ConfigError` for a top-level key of a config file (or of ``overrides``, e.g. an ``--args_file``)
    that is no key of the shipped bundles (:func:`medkd.bundles.known_keys`) and that nothing refers to (a typo, or a
    key of an older medkd: MONAI would keep it without a word), naming the nearest valid key; and for a key that the
    config refers to but no file defines (deleted by mistake), naming the file that refers to it."""
    contents = {str(path): read_config_file(path) for path in config_files}
    overrides = dict(overrides or {})
    merged = {key: value for content in contents.values() for key, value in content.items()}
    defined = {_top(key) for key in merged} | {_top(key) for key in overrides} | {"_meta_"}
    referred = references([merged, overrides])
    known = known_keys()
    for path, content in contents.items():
        unknown = [key for key in content if _top(key) not in known and _top(key) not in referred]
        if unknown:
            names = sorted(known | set(referred))
            typos = "; ".join(f"{key!r}{_nearest(key, names)}" for key in unknown)
            raise ConfigError(
                f"{path}: unknown key(s) {typos}: no bundle reads them and no other key refers to them. Fix the "
                "spelling, or delete them (a key of your own must be referred to, e.g. as @my_key, where it is used)."
            )
    for key, where in references(merged).items():
        if key not in defined:
            path = next(p for p, content in contents.items() if key in references(content))
            raise ConfigError(
                f"{path}: the key {key!r} is missing: {where} refers to it (@{key}) but no config file defines it. "
                f"Put it back in {path} (copy it from the bundle as shipped)."
            )


def _expected(config: ConfigParser, key: str) -> Any:
    """The value ``key`` has in the bundle's files, the planned default for a key taken from the plan
    (``$@plan['patch_size']``), or ``None`` when the files do not tell."""
    if key not in config:
        return None
    value = config[key]
    if isinstance(value, str) and value.startswith("$@plan['") and "default_plan" in config:
        return config["default_plan"].get(value[len("$@plan['") : -2])
    return value


def _value_error(key: str, value: Any, expected: Any) -> str | None:
    """What is wrong with ``value`` for ``key``, whose value in the bundle is ``expected``, or ``None``."""
    if value is None and key not in AT_LEAST and key not in POSITIVE:
        return None  # null: the key's own default (e.g. iterations_per_epoch: a whole pass over the data)
    if isinstance(expected, bool):
        if not isinstance(value, bool):
            return f"is not a boolean: write --{key} True or --{key} False (capitalised: false is read as text)"
        return None
    if isinstance(expected, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"is not a number: give e.g. --{key} {expected}"
        if isinstance(expected, int) and key in AT_LEAST and (not isinstance(value, int) or value < AT_LEAST[key]):
            return f"must be a whole number of at least {AT_LEAST[key]}"
        if key in POSITIVE and value <= 0:
            return "must be above 0"
        return None
    if isinstance(expected, list) and not isinstance(value, (list, tuple)):
        example = [value] * len(expected) if isinstance(value, (int, float)) and expected else expected
        return f'must be a list, one value per item: write --{key} "{example}"'
    return None


def check_override_values(config_files: Sequence[str | os.PathLike], overrides: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` for an override (command line, ``--args_file``) whose value has another type than
    the key has in the bundle: text for a boolean (``--amp false``), a number or a list; a number below its minimum
    (``--max_epochs 0``). Expressions and references (``$...``, ``@...``, ``%...``) are left to the run."""
    config = ConfigParser()
    config.read_config([str(f) for f in config_files])
    for key, value in overrides.items():
        if isinstance(value, str) and value[:1] in ("$", "@", "%"):
            continue
        problem = _value_error(key, value, _expected(config, key))
        if problem:
            raise ConfigError(f"--{key} {value!r} {problem}.")


def check_targets(config: Any) -> None:
    """Raise :class:`ConfigError` for a ``"_target_"`` that names no class or function MONAI or Python can import,
    naming the key and the nearest name MONAI knows."""
    locator = ComponentLocator()
    for key, target in _strings(config):
        if not key.endswith("_target_") or target[:1] in ("$", "@", "%"):
            continue
        if locator.get_component_module_name(target) is not None or locate(target) is not None:
            continue
        close = difflib.get_close_matches(target, list(locator._components_table), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else "it is not a class MONAI or torch knows."
        raise ConfigError(f"{key} {target!r} names nothing importable: {hint} Fix the name (or its module path).")


def _length_error(key: str, values: Any, length: int, what: str) -> ConfigError | None:
    if isinstance(values, (list, tuple)) and len(values) == length:
        return None
    return ConfigError(f"{key} {values!r} must be a list of {length} values, {what}.")


def check_lengths(
    spatial_dims: int,
    patch_size: Any,
    pixdim: Any = None,
    strides: Sequence[Any] | None = None,
    channels: Mapping[str, Any] | None = None,
) -> None:
    """Raise :class:`ConfigError` when lists that must agree do not: ``patch_size`` and ``pixdim`` one value per
    spatial axis, and each network's channels (``teacher_channels``, ``student_channels``) one per level, that is
    ``len(strides) + 1`` (a U-Net would otherwise be built with other levels than planned, or fail)."""
    axes = f"(spatial_dims={spatial_dims})"
    checks = [("patch_size", patch_size, spatial_dims, f"one per spatial axis {axes}")]
    if pixdim is not None and not isinstance(pixdim, (int, float)):
        checks.append(("pixdim", pixdim, spatial_dims, f"the spacing of each spatial axis {axes}"))
    for key, values in (channels or {}).items():
        levels = len(strides or []) + 1
        checks.append((key, values, levels, f"one channel count per level: len(strides) + 1 with strides {strides}"))
    for key, values, length, what in checks:
        error = _length_error(key, values, length, what)
        if error is not None:
            raise error
