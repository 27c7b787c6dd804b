"""What ``prepare`` writes: the output folder, ``dataset.json``, ``prepare.json``, ``sources.csv``, and the printed
report of every decision."""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medkd.data.loading import DataError
from medkd.prepare.splits import SPLITS

__all__ = ["Prepared", "output_folder", "write_prepared", "report_lines"]

GENERATED = ("images", "labels", "dataset.json", "prepare.json", "sources.csv")


@dataclass
class Prepared:
    """The result of ``prepare``: datalist entries per split and everything that was decided on the way.

    ``sources`` holds one row per datalist entry (its split, output path, label, source files, group, notes);
    ``dropped`` the source files left out and why; ``notes`` the conversions (alpha dropped, values snapped, ...);
    ``splits`` per split statistics (counts per class, groups); ``hints`` what to run next.
    """

    layout: str
    root: str
    output: str
    class_names: list[str]
    entries: dict[str, list[dict]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    sources: list[dict] = field(default_factory=list)
    dropped: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    splits: dict[str, dict] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    hints: list[str] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)

    def drop(self, path: str, reason: str) -> None:
        self.dropped.append({"path": path, "reason": reason})


def output_folder(output: str | os.PathLike, root: str | os.PathLike, overwrite: bool) -> Path:
    """Create the output folder; refuse one inside the input (or the reverse), or one holding an earlier result
    unless ``overwrite`` (which removes only what ``prepare`` wrote there)."""
    out, src = Path(output).expanduser().absolute(), Path(root).expanduser().absolute()
    if out == src or src in out.parents or out in src.parents:
        raise DataError(
            f"--output '{out}' and --root '{src}' overlap; write the prepared data to a folder outside the input "
            "(e.g. a sibling folder)."
        )
    existing = [name for name in GENERATED if (out / name).exists()]
    if existing and not overwrite:
        raise DataError(
            f"--output '{out}' already holds {', '.join(existing)}; pass --overwrite to replace them, or choose "
            "another folder."
        )
    if existing and not (out / "prepare.json").exists():
        raise DataError(
            f"--output '{out}' holds {', '.join(existing)} that python -m medkd prepare did not write (no "
            "prepare.json); choose an empty folder."
        )
    for name in existing:
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / "prepare.json").write_text('{"status": "incomplete: prepare stopped before the end"}\n')  # for --overwrite
    return out


def write_prepared(prepared: Prepared) -> dict[str, Path]:
    """Write ``dataset.json`` (non-empty lists only, with the ``labels`` map), ``prepare.json`` and
    ``sources.csv`` into ``prepared.output``; return their paths (also kept in ``prepared.files``)."""
    out = Path(prepared.output)
    labels = {str(i): name for i, name in enumerate(prepared.class_names)}
    datalist: dict[str, Any] = {
        "name": Path(prepared.root).name,
        "description": "written by `python -m medkd prepare`; see prepare.json for how",
        "labels": labels,
    }
    datalist.update({split: items for split, items in prepared.entries.items() if items})
    paths = {"datalist": out / "dataset.json", "report": out / "prepare.json", "sources": out / "sources.csv"}
    paths["datalist"].write_text(json.dumps(datalist, indent=1) + "\n")
    report = {
        "command": " ".join(["python -m medkd", *sys.argv[1:]]) if sys.argv[1:2] == ["prepare"] else None,
        "layout": prepared.layout,
        "root": prepared.root,
        "output": prepared.output,
        "settings": prepared.settings,
        "labels": labels,
        **prepared.extra,
        "splits": prepared.splits,
        "notes": prepared.notes,
        "dropped": prepared.dropped,
        "next": prepared.hints,
    }
    paths["report"].write_text(json.dumps(report, indent=2, default=str) + "\n")
    columns = list(dict.fromkeys(key for row in prepared.sources for key in row))
    with open(paths["sources"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns or ["split", "image"])
        writer.writeheader()
        writer.writerows(prepared.sources)
    prepared.files = paths
    return paths


def _counts(split: Mapping[str, Any]) -> str:
    parts = [f"{split['items']} items"]
    if split.get("source_images") is not None and split["source_images"] != split["items"]:
        parts.append(f"from {split['source_images']} images")
    if split.get("groups"):
        groups = split["groups"]
        parts.append(f"{len(groups)} groups" + (f" ({', '.join(groups)})" if len(groups) <= 12 else ""))
    if split.get("group_count") is not None:
        parts.append(f"{split['group_count']} groups (images of a group or of a duplicate group stay together)")
    return ", ".join(parts)


def report_lines(prepared: Prepared, limit: int = 20) -> list[str]:
    """The printed report: classes, each split's counts per class, notes, dropped files, files written, next
    steps. Long lists are cut at ``limit`` lines (prepare.json has them all)."""
    written = prepared.files
    lines = [f"Classes: {', '.join(f'{i} {name}' for i, name in enumerate(prepared.class_names))}"]
    for name, split in prepared.splits.items():
        lines.append(f"{name}: {_counts(split)}")
        for class_name, stats in split.get("classes", {}).items():
            lines.append(f"  {class_name}: {stats}")
    for title, rows in (
        ("Notes", prepared.notes),
        ("Dropped", [f"{d['path']}: {d['reason']}" for d in prepared.dropped]),
    ):
        if rows:
            lines.append(f"{title} ({len(rows)}):")
            lines += [f"  - {row}" for row in rows[:limit]]
            if len(rows) > limit:
                lines.append(f"  ... {len(rows) - limit} more in {written['report']}")
    lines.append(f"Wrote {written['datalist']} ({', '.join(s for s, e in prepared.entries.items() if e)})")
    lines.append(f"  with {written['report'].name} (settings and every decision) and {written['sources'].name}")
    lines.append(f"  (each entry's source file{'s' if prepared.layout == 'segmentation' else ''} and group).")
    missing = [s for s in SPLITS if not prepared.entries.get(s)]
    if missing:
        lines.append(
            f"No {' or '.join(missing)} list: the bundles hold {'it' if len(missing) == 1 else 'them'} out of the "
            "training list on their first run (medkd_splits.json beside the datalist; docs/data.md)."
        )
    if prepared.hints:
        lines.append("Next:")
        lines += [f"  {hint}" for hint in prepared.hints]
    return lines


def shown(paths: Sequence[str], limit: int = 5) -> str:
    """A few of ``paths``, comma-separated, with how many more."""
    more = f", ... ({len(paths)} in all)" if len(paths) > limit else ""
    return ", ".join(paths[:limit]) + more
