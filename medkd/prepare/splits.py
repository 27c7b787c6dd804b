"""Honest splits: split names from folder names, stratified hold-outs of whole groups, explicit group lists."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from medkd.data.loading import DataError

__all__ = ["SPLITS", "explicit_splits", "parse_split_spec", "split_of"]

SPLITS = ("training", "validation", "test")
_ALIASES = {
    "training": ("training", "train", "tr"),
    "validation": ("validation", "val", "valid", "dev"),
    "test": ("test", "testing", "ts"),
}


def split_of(name: str) -> str | None:
    """``"training"``, ``"validation"`` or ``"test"`` for a folder or option name (``Training``, ``val``, ``Test``,
    ...), else ``None``."""
    lowered = name.strip().lower()
    return next((split for split, names in _ALIASES.items() if lowered in names), None)


def parse_split_spec(specs: Sequence[str]) -> dict[str, list[str]] | dict[str, float]:
    """``["train=rat1,rat3", "val=rat4", "test=rat2"]`` → ``{"training": ["rat1", "rat3"], ...}`` (group names), or
    ``["train=0.8", "val=0.1", "test=0.1"]`` → ``{"training": 0.8, ...}`` (fractions of the items).

    Raises:
        DataError: an unknown split name, an entry without ``=``, a group in two splits, or mixed forms.
    """
    parsed: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        split = split_of(name)
        if not sep or split is None:
            raise DataError(
                f"--split {spec!r}: write SPLIT=GROUP,GROUP,... (or SPLIT=FRACTION) with SPLIT one of train, val, "
                "test, e.g. --split train=rat1,rat3 val=rat4 test=rat2."
            )
        if split in parsed:
            raise DataError(f"--split names the {split} split twice ({spec!r}); list its groups once, comma-separated.")
        parsed[split] = [v.strip() for v in values.split(",") if v.strip()]
    numbers = [_fraction(v) for values in parsed.values() for v in values]
    if parsed and all(n is not None for n in numbers) and all(len(v) == 1 for v in parsed.values()):
        return {split: float(values[0]) for split, values in parsed.items()}
    if any(n is not None for n in numbers) and not all(n is not None for n in numbers):
        raise DataError(f"--split {' '.join(specs)} mixes fractions and group names; use one form.")
    seen: dict[str, str] = {}
    for split, groups in parsed.items():
        for group in groups:
            if group in seen and seen[group] != split:
                raise DataError(f"--split puts group {group!r} in both {seen[group]} and {split}; keep it in one.")
            seen[group] = split
    return parsed


def _fraction(text: str) -> float | None:
    """The number in ``text`` when it is written as a fraction (``0.8``, ``.1``), else ``None`` (a group name)."""
    if "." not in text:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if 0 <= value <= 1 else None


def explicit_splits(groups: Sequence[str], spec: Mapping[str, Sequence[str]], group_by: str | None) -> dict[str, str]:
    """Split of each group from ``--split`` lists. Groups not listed go to training, unless ``train=`` is given,
    in which case every group must be listed.

    Raises:
        DataError: a listed group that no image has, or (with ``train=``) a group in no list.
    """
    known = set(groups)
    listed = {g: split for split, names in spec.items() for g in names}
    unknown = sorted(set(listed) - known)
    if unknown:
        how = f"--group-by {group_by!r}" if group_by else "each image is its own group (no --group-by)"
        raise DataError(
            f"--split names group(s) {unknown} that no image has ({how}); the groups are: {_shown(sorted(known))}."
        )
    missing = sorted(known - set(listed))
    if missing and "training" in spec:
        raise DataError(
            f"--split lists the training groups but not {_shown(missing)}; add them to a split, or leave train= out "
            "so that unlisted groups go to training."
        )
    return {g: listed.get(g, "training") for g in groups}


def _shown(names: Sequence[str], limit: int = 20) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
