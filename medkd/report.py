"""The results table of an evaluation: one row per network, one column per metric."""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from torch import nn

from medkd.evaluators import split_metric_name

__all__ = ["ResultsTable", "NameClassColumns", "markdown_table", "image_meta"]

logger = logging.getLogger("medkd.report")


def markdown_table(rows: Sequence[Mapping[str, object]]) -> str:
    """A markdown table of dict rows (columns in first-seen order; floats with 4 decimals)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))

    def cell(v: object) -> str:
        return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def image_meta(batch: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The image metadata of each sample of a decollated batch: MONAI's ``MetricsSaver`` names its per-case rows by
    the file in it (its ``batch_transform``)."""
    return [sample["image"].meta for sample in batch]


class ResultsTable:
    """At the end of an evaluation, write ``results.json`` and ``results.md`` and print the table.

    Args:
        output_dir: folder of the results files.
        networks: networks by name, to report their parameter counts.
        extra: constant columns added to every row (e.g. ``{"preset": "diversified"}``).
        class_names: names of the classes that a metric scores one by one, in its order (for Dice without the
            background: the foreground classes). Each network's per-image scores (``engine.state.metric_details``,
            shape ``(images, classes)``) are then averaged per class into columns ``"<metric>:<class>"``, e.g.
            ``"mean_dice:tumour"``; NaN scores (a class absent from an image and from its prediction) are skipped.
    """

    def __init__(
        self,
        output_dir: str,
        networks: Mapping[str, nn.Module] | None = None,
        extra: Mapping | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.networks = dict(networks or {})
        self.extra = dict(extra or {})
        self.class_names = list(class_names or [])

    def attach(self, engine: Engine) -> None:
        """Write the table when ``engine`` completes."""
        engine.add_event_handler(Events.COMPLETED, self)

    def rows(self, metrics: Mapping[str, float], details: Mapping[str, Any] | None = None) -> list[dict]:
        """One row per network found in ``metrics``, with per-class columns from ``details`` where they match."""
        table: dict[str, dict] = {}
        for name, value in metrics.items():
            parsed = split_metric_name(name)
            if parsed is None:
                continue
            metric, network = parsed
            row = table.setdefault(network, {"network": network, **self.extra})
            row[metric] = float(value)
            per_image = (details or {}).get(name)
            if self.class_names and per_image is not None:
                per_image = torch.as_tensor(per_image, dtype=torch.float64).reshape(-1, per_image.shape[-1])
                if per_image.shape[-1] == len(self.class_names):
                    for cls, score in zip(self.class_names, per_image.nanmean(dim=0).tolist(), strict=True):
                        row[f"{metric}:{cls}"] = score
        for network, row in table.items():
            if network in self.networks:
                row["params"] = sum(p.numel() for p in self.networks[network].parameters())
        return list(table.values())

    def __call__(self, engine: Engine) -> None:
        rows = self.rows(engine.state.metrics, getattr(engine.state, "metric_details", None))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "results.json").write_text(json.dumps(rows, indent=2))
        table = markdown_table(rows)
        (self.output_dir / "results.md").write_text(table + "\n")
        print(f"\nResults ({self.output_dir / 'results.md'}):\n{table}\n", flush=True)


class NameClassColumns:
    """Name the classes in the per-case (``*_raw.csv``) and summary (``*_summary.csv``) files of MONAI's
    ``MetricsSaver``, which calls them ``class0, class1, ...``.

    Attach after the ``MetricsSaver`` (handlers run in the order given), with the same folder and delimiter.

    Args:
        output_dir: the ``MetricsSaver``'s ``save_dir``.
        class_names: the names of ``class0, class1, ...`` in order (for Dice without the background: the foreground
            classes).
        delimiter: the ``MetricsSaver``'s delimiter.
    """

    def __init__(self, output_dir: str, class_names: Sequence[str], delimiter: str = ",") -> None:
        self.output_dir = Path(output_dir)
        self.names = {f"class{i}": name for i, name in enumerate(class_names)}
        self.delimiter = delimiter

    def attach(self, engine: Engine) -> None:
        """Rename when ``engine`` completes, after the reports were written."""
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if idist.get_rank() != 0:  # MetricsSaver writes on rank 0
            return
        for path in sorted(self.output_dir.glob("*_raw.csv")) + sorted(self.output_dir.glob("*_summary.csv")):
            with path.open(newline="") as f:
                rows = list(csv.reader(f, delimiter=self.delimiter))
            if not rows:
                continue
            if path.name.endswith("_raw.csv"):  # a header row: filename, class0, class1, ..., mean
                rows[0] = [self.names.get(c, c) for c in rows[0]]
            else:  # one row per class: class0, class1, ..., mean
                rows = [[self.names.get(r[0], r[0]), *r[1:]] if r else r for r in rows]
            with path.open("w", newline="") as f:
                csv.writer(f, delimiter=self.delimiter, lineterminator="\n").writerows(rows)
