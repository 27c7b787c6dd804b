"""Pictures of a classification evaluation: each class's one-vs-rest ROC curves of every network
(``eval/roc.png``) and each network's confusion matrix, counts and row-normalised (``eval/confusion_<network>.png``),
drawn from the class probabilities the evaluation saves (:class:`medkd.training.evaluators.ProbabilitiesCSV`)."""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from ignite.engine import Engine, Events

from medkd.tools.overlays import DPI, MAX_WIDTH_PX, pyplot, save_png

__all__ = ["ROC_PNG", "ClassificationPictures", "read_probabilities", "roc_curve", "confusion_counts"]

logger = logging.getLogger("medkd.tools.class_pictures")

ROC_PNG = "roc.png"
CONFUSION_PNG = "confusion_{}.png"  # of each network


def read_probabilities(path: str | Path, networks: Sequence[str], num_classes: int) -> tuple[np.ndarray, dict]:
    """The labels (N,) and each network's probabilities (N, classes) of a probabilities CSV file of a
    multi-network evaluation (columns ``image``, ``label``, then ``<network>_<class>`` in order)."""
    with open(path, newline="") as f:
        header, *rows = list(csv.reader(f))
    if header[1:2] != ["label"]:  # images without labels: nothing to score
        rows = []
    labels = np.array([int(row[1]) for row in rows], dtype=np.int64)
    values = np.array([[float(v) for v in row[2:]] for row in rows], dtype=np.float64).reshape(len(rows), -1)
    return labels, {n: values[:, i * num_classes : (i + 1) * num_classes] for i, n in enumerate(networks)}


def roc_curve(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """False and true positive rates of every threshold of ``scores`` (tied scores one step), and the area under
    them; NaN area when ``positive`` (booleans) holds one kind only."""
    order = np.argsort(-scores, kind="stable")
    hits, ranked = positive[order].astype(np.float64), scores[order]
    last_of_ties = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]
    tp, fp = np.cumsum(hits)[last_of_ties], np.cumsum(1 - hits)[last_of_ties]
    if not tp[-1] or not fp[-1]:
        return np.array([0.0, 1.0]), np.array([0.0, 1.0]), float("nan")
    fpr, tpr = np.r_[0.0, fp / fp[-1]], np.r_[0.0, tp / tp[-1]]
    return fpr, tpr, float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))  # the trapezoid rule


def confusion_counts(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """The confusion matrix (true class by row, predicted class by column) of class indices."""
    return np.bincount(labels * num_classes + predicted, minlength=num_classes**2).reshape(num_classes, num_classes)


def draw_roc(labels: np.ndarray, probabilities: Mapping[str, np.ndarray], class_names: Sequence[str], path: Path):
    """One axes per class: each network's one-vs-rest ROC curve, its AUC in the legend."""
    plt = pyplot()
    columns = min(len(class_names), 4)
    rows = math.ceil(len(class_names) / columns)
    size = min(3.0, MAX_WIDTH_PX / DPI / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(size * columns, size * rows + 0.4), squeeze=False)
    for c, (ax, name) in enumerate(zip(axes.flat, class_names, strict=False)):
        for network, scores in probabilities.items():
            fpr, tpr, auc = roc_curve(labels == c, scores[:, c])
            ax.plot(fpr, tpr, label=f"{network} {auc:.3f}", linewidth=1)
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8)
        ax.set_title(f"{name} vs rest ({int((labels == c).sum())} of {len(labels)})", fontsize=8)
        ax.set_xlabel("false positive rate", fontsize=7)
        ax.set_ylabel("true positive rate", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.legend(title="AUC", fontsize=6, title_fontsize=6, loc="lower right")
    for ax in axes.flat[len(class_names) :]:
        ax.set_axis_off()
    figure.suptitle("ROC curves on the test list, one class against the rest", fontsize=9)
    figure.tight_layout()
    save_png(figure, path)


def draw_confusion(counts: np.ndarray, class_names: Sequence[str], network: str, path: Path) -> None:
    """A network's confusion matrix twice, side by side: counts, and each row divided by its count."""
    plt = pyplot()
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    size = min(0.6 * len(class_names) + 1.6, MAX_WIDTH_PX / DPI / 2)
    figure, axes = plt.subplots(1, 2, figsize=(2 * size, size + 0.4))
    for ax, values, title, text in (
        (axes[0], counts, "counts", lambda v: f"{int(v)}"),
        (axes[1], shares, "share of the true class (row)", lambda v: f"{v:.2f}"),
    ):
        ax.imshow(values / max(values.max(), 1e-12), cmap="Blues", vmin=0, vmax=1)
        for (i, j), value in np.ndenumerate(values):
            dark = values[i, j] > 0.6 * values.max()
            ax.text(j, i, text(value), ha="center", va="center", fontsize=7, color="white" if dark else "black")
        ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(class_names)), class_names, fontsize=7)
        ax.set_xlabel("predicted", fontsize=7)
        ax.set_ylabel("true", fontsize=7)
        ax.set_title(title, fontsize=8)
    figure.suptitle(f"{network}: {int(np.trace(counts))} of {int(counts.sum())} test images right", fontsize=9)
    figure.tight_layout()
    save_png(figure, path)


class ClassificationPictures:
    """When a classification evaluation completes, draw ``roc.png`` and ``confusion_<network>.png`` in
    ``output_dir`` from the probabilities file that :class:`~medkd.training.evaluators.ProbabilitiesCSV` wrote
    (attach it after that handler).

    Args:
        probabilities_file: the CSV file of every network's class probabilities.
        output_dir: the folder of the pictures.
        class_names: the class names, index order.
        networks: the networks of the file, in its column order (e.g.
            :func:`~medkd.training.evaluators.scored_networks`).
        enabled: ``False`` to draw nothing (the bundle key ``overlays``).
    """

    def __init__(
        self,
        probabilities_file: str,
        output_dir: str,
        class_names: Sequence[str],
        networks: Sequence[str],
        enabled: bool = True,
    ) -> None:
        self.probabilities_file = Path(probabilities_file)
        self.output_dir = Path(output_dir)
        self.class_names = [str(c) for c in class_names]
        self.networks = list(networks)
        self.enabled = enabled

    def attach(self, engine: Engine) -> None:
        """Draw when ``engine`` completes (nothing when not enabled)."""
        if self.enabled:
            engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine | None = None) -> list[Path]:
        """Draw the pictures; return their paths (none for a file without labels)."""
        labels, probabilities = read_probabilities(self.probabilities_file, self.networks, len(self.class_names))
        if not len(labels):
            return []
        self.output_dir.mkdir(parents=True, exist_ok=True)
        paths = [self.output_dir / ROC_PNG]
        draw_roc(labels, probabilities, self.class_names, paths[0])
        for network, scores in probabilities.items():
            paths.append(self.output_dir / CONFUSION_PNG.format(network))
            counts = confusion_counts(labels, scores.argmax(axis=1), len(self.class_names))
            draw_confusion(counts, self.class_names, network, paths[-1])
        logger.info(f"ROC curves and confusion matrices in {self.output_dir}")
        return paths
