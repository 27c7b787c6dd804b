"""Nothing lost: the one policy for a user's earlier results (checkpoints, histories, evaluation files, plans, reports,
inference folders). A stage about to write where an earlier run wrote first renames what is there with a timestamp
(:func:`set_aside`, with a warning: :func:`keep_previous`); a stage that writes a new folder each time takes a name
no earlier run has (:func:`numbered`). What each stage sets aside is said where it writes
(:class:`medkd.training.handlers.ResumeCheckpoint`, :mod:`medkd.tools.outputs`)."""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["numbered", "set_aside", "keep_previous"]


def numbered(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """The names to try, in order, for a new file or folder: ``path``, then ``path`` with ``-1``, ``-2``, ... before
    ``suffix`` (the end of its name kept last, e.g. ``".pt"``)."""
    path = Path(path)
    stem = path.name[: len(path.name) - len(suffix)]
    yield path
    for n in itertools.count(1):
        yield path.with_name(f"{stem}-{n}{suffix}")


def set_aside(paths: Iterable[str | os.PathLike], stamp: str | None = None) -> dict[Path, Path]:
    """Rename each existing file or folder of ``paths`` with a timestamp before its suffix (``sp.pt`` ->
    ``sp.20261126-101500.pt``, ``results`` -> ``results.20261126-101500``), never over an existing name; return
    ``{old: new}`` of those moved."""
    stamp = stamp or time.strftime("%Y%m%d-%H%M%S")
    moved = {}
    for path in map(Path, paths):
        if not path.exists():
            continue
        suffix = path.suffix if path.is_file() else ""
        stem = path.name[: len(path.name) - len(suffix)]
        target = next(p for p in numbered(path.with_name(f"{stem}.{stamp}{suffix}"), suffix) if not p.exists())
        path.rename(target)
        moved[path] = target
    return moved


def keep_previous(paths: Iterable[str | os.PathLike], why: str) -> dict[Path, Path]:
    """:func:`set_aside` the existing files and folders of ``paths``, with a warning saying ``why`` and where they
    went (one policy for every stage: nothing a user has is replaced without a word); return ``{old: new}``."""
    moved = set_aside(paths)
    if moved:
        logging.getLogger("medkd").warning(
            "%s: the previous run's %s moved aside to %s",
            why,
            ", ".join(str(old) for old in moved),
            ", ".join(new.name for new in moved.values()),
        )
    return moved
