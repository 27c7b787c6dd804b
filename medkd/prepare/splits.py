"""Honest splits: split names from folder names, stratified hold-outs of whole groups, explicit group lists."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from medkd.data.loading import DataError

__all__ = ["SPLITS", "Unit", "explicit_splits", "hold_out", "parse_split_spec", "random_splits", "split_of"]

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


@dataclass(frozen=True)
class Unit:
    """What a split moves as one: a group of ``size`` items, of one ``stratum`` (e.g. its class) or ``None``."""

    name: str
    stratum: str | None
    size: int


def hold_out(units: Sequence[Unit], fraction: float, rng: np.random.Generator) -> set[str]:
    """Names of the units held out: ``fraction`` of the items of each stratum, in whole units.

    In each stratum (sorted), the units are shuffled by ``rng`` and taken while each brings the count closer to
    ``fraction`` of the stratum's items. When ``fraction > 0`` at least one unit of every stratum that has two or
    more is taken, and one is always left.
    """
    if fraction <= 0:
        return set()
    strata: dict[str, list[Unit]] = defaultdict(list)
    for unit in sorted(units, key=lambda u: u.name):
        strata[str(unit.stratum)].append(unit)
    taken: set[str] = set()
    for stratum in sorted(strata):
        members = strata[stratum]
        order = [members[i] for i in rng.permutation(len(members))]
        target = fraction * sum(u.size for u in members)
        count, chosen = 0, []
        for unit in order:
            if len(chosen) == len(members) - 1:
                break
            if abs(count + unit.size - target) < abs(count - target):
                chosen.append(unit)
                count += unit.size
        if not chosen and len(members) > 1:
            chosen.append(min(order, key=lambda u: u.size))
        taken.update(u.name for u in chosen)
    return taken


def random_splits(units: Sequence[Unit], val_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    """Split of each unit: ``test_fraction`` of the items (stratified) to test, then ``val_fraction`` of all items
    to validation, the rest to training; reproducible by ``seed``."""
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise DataError(
            f"--val-fraction {val_fraction} and --test-fraction {test_fraction} must each be in [0, 1) and leave "
            "items for training (their sum below 1)."
        )
    rng = np.random.default_rng(seed)
    test = hold_out(units, test_fraction, rng)
    rest = [u for u in units if u.name not in test]
    validation = hold_out(rest, val_fraction / (1 - test_fraction), rng)
    return {u.name: "test" if u.name in test else "validation" if u.name in validation else "training" for u in units}


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
