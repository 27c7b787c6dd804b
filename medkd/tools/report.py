"""Reports: the results table of an evaluation (one row per network, one column per metric), and the summary,
timing and plot of a method comparison (:mod:`medkd.tools.compare` runs it, this module writes it)."""

from __future__ import annotations

import csv
import json
import logging
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from torch import nn

from medkd.bundles import COMPARISON_PNG, RESULTS_CSV, RESULTS_JSON, RESULTS_MD
from medkd.tools.comparison_plot import plot_comparison
from medkd.tools.gains import RESAMPLES, Gain, Runs, gain_cells, method_gains
from medkd.training.evaluators import ENSEMBLE, METRICS, split_metric_name
from medkd.training.postprocessing import PostprocessingChoice

__all__ = [
    "ResultsTable",
    "NameClassColumns",
    "markdown_table",
    "image_meta",
    "inference_ms",
    "summarize",
    "paired_gains",
    "write_comparison",
]

logger = logging.getLogger("medkd.tools.report")

BASELINE = "student"  # the preset every other method's gain is measured against
GAINS_TITLE = (
    "Gain in {metric} over the students trained alone (preset `student`), paired by network and seed (columns: see "
    "the legend below):"
)
GAINS_LEGEND = """\
- gain: the score minus that of the same network trained alone with the same seed, mean ± s.d. over seeds.
- 95% CI: the gain's 95 % confidence interval from a paired bootstrap over test images and seeds ({resamples} \
resamples, the same drawn images for both methods; `medkd.tools.gains`); – where per-image scores were not saved.
- (n.s.): not shown, the interval contains 0.
- seeds won: seeds with a gain (for hd95, a lower distance) / seeds paired.
- gap recovered: (method − alone) / (teacher − alone), means over the paired seeds, the teacher from this \
comparison; – where the teacher does not score above the network trained alone."""


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
    """At the end of an evaluation, write ``results.json`` and ``results.md`` (:data:`medkd.bundles.RESULTS_JSON`,
    :data:`~medkd.bundles.RESULTS_MD`) and print the table.

    Args:
        output_dir: folder of the results files.
        networks: networks by name, to report their parameter counts.
        extra: constant columns added to every row (e.g. ``{"preset": "diversified"}``).
        class_names: names of the classes that a metric scores one by one, in its order (for Dice without the
            background: the foreground classes). Each network's per-image scores (``engine.state.metric_details``,
            shape ``(images, classes)``) are then averaged per class into columns ``"<metric>:<class>"``, e.g.
            ``"mean_dice:tumour"``; NaN scores (a class absent from an image's label map, or from it and its
            prediction) and infinite ones (the HD95 of a class in only one of them) are left out, and counted in
            ``results.md``.
        ensemble: the networks averaged into the ``"ensemble"`` row (see
            :func:`medkd.training.evaluators.ensemble_members`);
            its parameter count is the sum of theirs.
        surface_tolerances: the NSD tolerance of each of ``class_names``, when the evaluation scores HD95 and NSD
            (:mod:`medkd.training.surface_metrics`): ``results.md`` then says what they measure, in which unit.
        postprocessing: the post-processing chosen on the validation images
            (:class:`medkd.training.postprocessing.PostprocessingChoice`): ``results.md`` says what it kept.
    """

    def __init__(
        self,
        output_dir: str,
        networks: Mapping[str, nn.Module] | None = None,
        extra: Mapping | None = None,
        class_names: Sequence[str] | None = None,
        ensemble: Sequence[str] = (),
        surface_tolerances: Sequence[float] | None = None,
        postprocessing: PostprocessingChoice | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.postprocessing = postprocessing
        self.surface_tolerances = None if surface_tolerances is None else list(surface_tolerances)
        self.networks = dict(networks or {})
        self.ensemble = list(ensemble)
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
            per_image = self._class_scores((details or {}).get(name))
            if per_image is not None:
                for cls, score in zip(self.class_names, _finite_mean(per_image).tolist(), strict=True):
                    row[f"{metric}:{cls}"] = score
        for network, row in table.items():
            members = self.ensemble if network == ENSEMBLE else [network]
            if members and all(m in self.networks for m in members):
                row["params"] = sum(p.numel() for m in members for p in self.networks[m].parameters())
        return list(table.values())

    def surface_note(self) -> str:
        """What the HD95 and NSD columns measure, in which unit and at which tolerances; ``""`` without them."""
        if self.surface_tolerances is None:
            return ""
        tolerances = ", ".join(f"{c} {t:g}" for c, t in zip(self.class_names, self.surface_tolerances, strict=True))
        return (
            "hd95: the 95th-percentile Hausdorff distance between the prediction's and the label map's surfaces, in "
            "the unit of the images' spacing (`pixdim`: mm for most scans; lower is better); nsd: the normalised "
            f"surface Dice, the share of both surfaces within a tolerance of the other ({tolerances}; "
            "`surface_tolerance_mm`)."
        )

    def absent_note(self, details: Mapping[str, Any] | None) -> str:
        """A note naming the classes that some images lack (their per-image score is NaN: Dice is undefined without
        the class in the label map), so the reader knows those images are left out of that class's mean; ``""`` when
        every image has every class."""
        per_image = next((t for v in (details or {}).values() if (t := self._class_scores(v)) is not None), None)
        if per_image is None:
            return ""
        missing = torch.isnan(per_image).sum(dim=0).tolist()
        counts = [f"{c} in {n} of {per_image.shape[0]}" for c, n in zip(self.class_names, missing, strict=True) if n]
        if not counts:
            return ""
        return (
            f"Images without a class in their label map ({', '.join(counts)}) have no score for it and are left out of "
            "its mean: a network's false positives on them are not counted."
        )

    def infinite_note(self, details: Mapping[str, Any] | None) -> str:
        """A note counting, for each metric and network, the images whose score of a class is infinite (the HD95 of
        a class that only one of the prediction and the label map has: a missed class, or one predicted where there
        is none), left out of the means; ``""`` when there are none."""
        counts = []
        for name, values in (details or {}).items():
            per_image, parsed = self._class_scores(values), split_metric_name(name)
            if per_image is None or parsed is None or not torch.isinf(per_image).any():
                continue
            infinite = torch.isinf(per_image).sum(dim=0).tolist()
            images = per_image.shape[0]
            classes = [f"{c} in {n} of {images}" for c, n in zip(self.class_names, infinite, strict=True) if n]
            counts.append(f"{parsed[0]} of {parsed[1]}: {', '.join(classes)}")
        if not counts:
            return ""
        return (
            f"Infinite scores ({'; '.join(counts)}) are images where only one of the prediction and the label map has "
            "the class (a missed class, or one predicted where there is none): left out of the means above; the "
            "per-case CSV files show them as inf, and their NSD is 0 and counted."
        )

    def _class_scores(self, values: Any) -> torch.Tensor | None:
        """``values`` as per-image scores ``(images, classes)`` of ``class_names``, or ``None`` where they are not
        (no class names, another number of columns, or the AUC's saved predictions and labels)."""
        if not self.class_names or not hasattr(values, "shape") or values.shape[-1] != len(self.class_names):
            return None
        return torch.as_tensor(values, dtype=torch.float64).reshape(-1, values.shape[-1])

    def __call__(self, engine: Engine) -> None:
        details = getattr(engine.state, "metric_details", None)
        rows = self.rows(engine.state.metrics, details)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / RESULTS_JSON).write_text(json.dumps(rows, indent=2), encoding="utf-8")
        table = markdown_table(rows)
        chosen = self.postprocessing.describe() if self.postprocessing is not None else ""
        for note in (chosen, self.surface_note(), self.absent_note(details), self.infinite_note(details)):
            table += f"\n\n{note}" if note else ""
        (self.output_dir / RESULTS_MD).write_text(table + "\n", encoding="utf-8")
        print(f"\nResults ({self.output_dir / RESULTS_MD}):\n{table}\n", flush=True)


def _finite_mean(per_image: torch.Tensor) -> torch.Tensor:
    """The mean of each column of ``per_image`` over its finite values; NaN for a column without any."""
    finite = torch.isfinite(per_image)
    return torch.where(finite, per_image, 0.0).sum(dim=0) / finite.sum(dim=0)


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
            with path.open(newline="", encoding="utf-8") as f:
                rows = list(csv.reader(f, delimiter=self.delimiter))
            if not rows:
                continue
            if path.name.endswith("_raw.csv"):  # a header row: filename, class0, class1, ..., mean
                rows[0] = [self.names.get(c, c) for c in rows[0]]
            else:  # one row per class: class0, class1, ..., mean
                rows = [[self.names.get(r[0], r[0]), *r[1:]] if r else r for r in rows]
            with path.open("w", newline="", encoding="utf-8") as f:
                csv.writer(f, delimiter=self.delimiter, lineterminator="\n").writerows(rows)


# ------------------------------------------------------------------------------------------ method comparison


def inference_ms(networks: Mapping[str, torch.nn.Module], input_shape: Sequence[int], repeats: int = 20) -> dict:
    """Median CPU/GPU forward time in ms of each network on one input of ``input_shape`` (batch 1)."""
    times = {}
    x = torch.rand(*input_shape)
    for name, net in networks.items():
        net.eval()
        with torch.no_grad():
            for _ in range(3):
                net(x)
            samples = []
            for _ in range(repeats):
                start = time.perf_counter()
                net(x)
                samples.append((time.perf_counter() - start) * 1000)
        times[name] = statistics.median(samples)
    return times


def write_comparison(
    rows: Sequence[Mapping], curves: Mapping[tuple[str, int], Path], output: str | Path, evals: Runs | None = None
) -> str:
    """Write a comparison's files to ``output``: every row (``results.csv``), the summary table and, with the
    ``student`` preset, the gains over it (``results.md``, :func:`summarize` and :func:`paired_gains`, also returned
    and printed) and the plot of test scores, gains and validation ``curves`` (``comparison.png``,
    :func:`~medkd.tools.comparison_plot.plot_comparison`). ``evals``: the evaluation folder of each (preset, seed)
    run, whose per-image scores give the gains' confidence intervals."""
    output = Path(output)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with (output / RESULTS_CSV).open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    gains = method_gains(rows, [m for m in _score_columns(rows) if ":" not in m], evals or {}, BASELINE)
    table = summarize(rows)
    if gains:
        table += f"\n\n{paired_gains(gains)}"
    (output / RESULTS_MD).write_text(table + "\n", encoding="utf-8")
    plot_comparison(rows, curves, output / COMPARISON_PNG, gains)
    print(f"\nMethod comparison ({output / RESULTS_MD}, plot {output / COMPARISON_PNG}):\n{table}\n", flush=True)
    return table


def _metric(rows: Sequence[Mapping]) -> str:
    return next(m for m in METRICS if any(m in r for r in rows))


def _std(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _mean_std(values: Sequence[float], sign: str = "") -> str:
    """``"mean ± s.d."`` of ``values``, or only the mean for one value (whose spread is unknown, not zero)."""
    spread = f" ± {_std(values):.4f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):{sign}.4f}{spread}"


def _score_columns(rows: Sequence[Mapping]) -> list[str]:
    """The metrics found in ``rows``, each followed by its per-class columns (``"mean_dice:<class>"``, in first-seen
    order)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    metrics = [m for m in METRICS if m in keys]
    return [c for m in metrics for c in (m, *(k for k in keys if ":" in k and k.split(":")[0] == m))]


def summarize(rows: Sequence[Mapping]) -> str:
    """Markdown table: per preset and network, mean ± std over seeds of each metric (and of each class's score, where
    the evaluation reported them), parameters, ms per image."""
    metrics = _score_columns(rows)
    groups: dict[tuple[str, str], list[Mapping]] = {}
    for r in rows:
        groups.setdefault((str(r["preset"]), str(r["network"])), []).append(r)
    table = []
    for (preset, network), group in groups.items():
        line: dict[str, Any] = {"method": "teacher" if preset == "-" else preset, "network": network}
        line["seeds"] = len(group)
        for m in metrics:
            values = [float(r[m]) for r in group if r.get(m) not in (None, "")]
            line[m] = _mean_std(values) if values else None
        line["params"] = group[0].get("params")
        line["ms/image"] = f"{float(group[0]['ms_per_image']):.2f}" if "ms_per_image" in group[0] else None
        table.append(line)
    return markdown_table(table)


def paired_gains(gains: Sequence[Gain]) -> str:
    """Markdown: per metric, a table of each method's gain over the students trained alone per network (mean ± s.d.
    over seeds, 95 % bootstrap interval, seeds won, gap recovered; see :mod:`medkd.tools.gains`), then the legend.
    Pairing by seed removes what a seed does to every method alike (the split of batches, the initial weights), and
    pairing by test image what an image does to every network alike, so a gain smaller than the spread of the scores
    can still show."""
    metrics = list(dict.fromkeys(g.metric for g in gains))
    tables = []
    for metric in metrics:
        lines = [
            {"method": g.method, "network": g.network, "seeds": len(g.gains), **gain_cells(g)}
            for g in gains
            if g.metric == metric
        ]
        tables.append(f"{GAINS_TITLE.format(metric=metric)}\n\n{markdown_table(lines)}")
    return "\n\n".join([*tables, GAINS_LEGEND.format(resamples=RESAMPLES)])
