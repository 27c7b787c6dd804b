"""Finding the files of an images-plus-masks layout: image/mask pairs by wildcard captures, groups by a regular
expression, and JSON sidecars (BIDS inheritance) for per-image metadata such as the pixel size.

The pairing rule: every wildcard of ``--images`` and ``--masks`` (``*``, ``**``, ``?``, ``[...]``) captures the text it
matches; an image and a mask are a pair when their captures are equal, in order. Both patterns need the same number
of wildcards, and the fixed text around them is what differs between an image path and its mask path.
"""

from __future__ import annotations

import glob
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medkd.data.loading import DataError

__all__ = ["Pair", "find_sidecar", "pair_files", "pattern_regex", "pixel_size_from_sidecar"]

_WILDCARD = re.compile(r"\*\*/|\*\*|\*|\?|\[[^\]]*\]")


def pattern_regex(pattern: str) -> re.Pattern:
    """A regular expression matching what the glob ``pattern`` matches (relative POSIX paths), one capturing group
    per wildcard: ``*`` and ``?`` within a folder name, ``**`` across folders, ``[...]`` one character."""
    parts, last = [], 0
    for m in _WILDCARD.finditer(pattern):
        parts.append(re.escape(pattern[last : m.start()]))
        token = m.group()
        if token == "**/":  # zero or more folders
            parts.append("((?:.*/)?)")
        elif token == "**":
            parts.append("(.*)")
        elif token == "*":
            parts.append("([^/]*)")
        elif token == "?":
            parts.append("([^/])")
        else:
            inner = token[1:-1]
            inner = "^" + inner[1:] if inner.startswith("!") else inner
            parts.append(f"([{inner}])")
        last = m.end()
    parts.append(re.escape(pattern[last:]))
    return re.compile("".join(parts))


def _matches(root: Path, pattern: str) -> dict[tuple[str, ...], str]:
    """Files under ``root`` matching ``pattern``, by their wildcard captures."""
    regex = pattern_regex(pattern)
    found = {}
    for rel in sorted(glob.glob(pattern, root_dir=str(root), recursive=True)):
        rel = Path(rel).as_posix()
        match = regex.fullmatch(rel)
        if match is not None and (root / rel).is_file():
            found[match.groups()] = rel
    return found


@dataclass(frozen=True)
class Pair:
    """An image and its mask, relative to the root, and the wildcard captures they share."""

    image: str
    mask: str
    key: tuple[str, ...]


def _hint(images: str, masks: str, image_key: tuple[str, ...], mask_keys: Sequence[tuple[str, ...]]) -> str:
    """When a capture of the image and one of a mask differ only by a suffix or prefix, the pattern that fixes it."""
    for key in mask_keys:
        if len(key) != len(image_key):
            continue
        diffs = [i for i, (a, b) in enumerate(zip(image_key, key, strict=True)) if a != b]
        if len(diffs) != 1:
            continue
        i = diffs[0]
        a, b = image_key[i], key[i]
        longer, shorter, pattern, side = (b, a, masks, "--masks") if len(b) > len(a) else (a, b, images, "--images")
        spans = list(_WILDCARD.finditer(pattern))
        if longer.startswith(shorter):
            extra = longer[len(shorter) :]
            fixed = pattern[: spans[i].end()] + extra + pattern[spans[i].end() :]
        elif longer.endswith(shorter):
            extra = longer[: len(longer) - len(shorter)]
            fixed = pattern[: spans[i].start()] + extra + pattern[spans[i].start() :]
        else:
            continue
        return (
            f" Wildcard {i + 1} matches {a!r} in the image path and {b!r} in the mask path: write the text "
            f"{extra!r} into the pattern, e.g. {side} '{fixed}'."
        )
    return ""


def pair_files(root: Path, images: str, masks: str) -> tuple[list[Pair], list[str], list[str]]:
    """Pairs of ``images`` and ``masks`` (globs relative to ``root``) with equal wildcard captures, and the images
    and masks left without a partner.

    Raises:
        DataError: the patterns have different numbers of wildcards, a pattern matches nothing, or no pair is found.
    """
    n_images, n_masks = len(_WILDCARD.findall(images)), len(_WILDCARD.findall(masks))
    if n_images != n_masks:
        raise DataError(
            f"--images '{images}' has {n_images} wildcard(s) but --masks '{masks}' has {n_masks}: images and masks are "
            "paired by the text their wildcards match, in order, so both patterns need the same wildcards."
        )
    found_images, found_masks = _matches(root, images), _matches(root, masks)
    for pattern, found, option in ((images, found_images, "--images"), (masks, found_masks, "--masks")):
        if not found:
            raise DataError(
                f"{option} '{pattern}' matches no file under '{root}'. Patterns are globs relative to --root "
                "('*' within a folder name, '**' across folders)."
            )
    pairs = [Pair(found_images[k], found_masks[k], k) for k in found_images if k in found_masks]
    lone_images = [found_images[k] for k in found_images if k not in found_masks]
    lone_masks = [found_masks[k] for k in found_masks if k not in found_images]
    if not pairs:
        first = next(iter(found_images))
        raise DataError(
            f"no image of --images '{images}' has a mask in --masks '{masks}': an image and its mask must have the "
            f"same text in each wildcard (e.g. image '{found_images[first]}' has {list(first)}, mask "
            f"'{next(iter(found_masks.values()))}' has {list(next(iter(found_masks)))})."
            + _hint(images, masks, first, list(found_masks))
        )
    return pairs, lone_images, lone_masks


def _entities(stem: str) -> tuple[set[str], str]:
    parts = stem.split("_")
    return set(parts[:-1]), parts[-1]


def find_sidecar(image: Path, root: Path) -> Path | None:
    """The JSON sidecar of an image: ``<image stem>.json`` beside it, else, by BIDS inheritance, the nearest ``.json``
    (same folder first, then its parents up to ``root``) whose name has the image's suffix (the part after the last
    ``_``) and only entities (``key-value`` parts) the image has: ``sub-rat3_SEM.json`` for
    ``sub-rat3_sample-data9_SEM.png``."""
    stem = image.name.split(".")[0]
    own = image.with_name(stem + ".json")
    if own.is_file():
        return own
    entities, suffix = _entities(stem)
    folder = image.parent
    while True:
        best: tuple[int, Path] | None = None
        for candidate in sorted(folder.glob("*.json")):
            c_entities, c_suffix = _entities(candidate.name[: -len(".json")])
            if c_suffix == suffix and c_entities <= entities and (best is None or len(c_entities) > best[0]):
                best = (len(c_entities), candidate)
        if best is not None:
            return best[1]
        if folder == root or root not in folder.parents:
            return None
        folder = folder.parent


def pixel_size_from_sidecar(sidecar: Path, key: str) -> tuple[tuple[float, float] | None, Any]:
    """``(x, y)`` pixel size from a sidecar's ``key`` (a number or a list of 2 or more numbers) and the value of
    ``<key>Units`` (e.g. ``"um"``), or ``(None, None)`` when the key is absent.

    Raises:
        DataError: the sidecar is not valid JSON or the value is not a positive number or list of numbers.
    """
    try:
        content = json.loads(sidecar.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"sidecar '{sidecar}' is not valid JSON ({e}); fix it or give --source-pixel-size.") from e
    if not isinstance(content, dict) or key not in content:
        return None, None
    value = content[key]
    values = value if isinstance(value, list) else [value]
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError):
        numbers = []
    if not numbers or any(v <= 0 for v in numbers):
        raise DataError(f"sidecar '{sidecar}': {key} is {value!r}, not a positive number or a list of them.")
    return (numbers[0], numbers[1] if len(numbers) > 1 else numbers[0]), content.get(f"{key}Units")
