"""Honest splits of a list of cases: groups of cases that stay in one list (:func:`group_of`) and stratified
hold-outs of whole groups (:func:`random_splits`), used by the split file (:mod:`medkd.data.held_out`) and by
``python -m medkd prepare``."""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medkd.errors import DataError

__all__ = ["Unit", "group_of", "group_regex", "hold_out", "random_splits", "relative"]


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


def group_regex(group_by: str | None, option: str = "--group-by") -> re.Pattern | None:
    """``group_by`` compiled (``None`` without one).

    Raises:
        DataError: naming ``option`` when it is not a valid regular expression.
    """
    if not group_by:
        return None
    try:
        return re.compile(group_by)
    except re.error as e:
        raise DataError(f"{option} {group_by!r} is not a valid regular expression ({e}).") from e


def group_of(path: str, regex: re.Pattern | None) -> str | None:
    """The group of a path (relative, POSIX): the first capturing group of ``regex`` found in it, or the whole match
    when it has none; ``None`` when it does not match. Without ``regex``, the path itself."""
    if regex is None:
        return path
    match = regex.search(path)
    if match is None:
        return None
    return match.group(1) if regex.groups else match.group(0)


def relative(path: str | os.PathLike, output: str | os.PathLike) -> str:
    """``path`` relative to the output folder when it lies inside it (the datalist then moves with the folder),
    else absolute."""
    path, output = Path(path).absolute(), Path(output).absolute()
    return path.relative_to(output).as_posix() if output in path.parents else str(path)
