"""Gains you can trust: each method's gain over the same student network trained alone, with a 95 % confidence
interval from a paired bootstrap over test images and seeds, the seeds it won and the share of the teacher–student
gap it recovers (:mod:`medkd.tools.report` writes them into a comparison's ``results.md`` and plot).

The bootstrap (:func:`bootstrap_interval`): each of ``resamples`` resamples draws the test images with replacement
(as many as there are) and the paired seeds with replacement, from one generator with a fixed seed, so a rerun gives
the same interval. The same drawn images score both methods (paired: what an image does to every network alike
cancels out). A resample's gain is the mean, over the drawn seeds, of the method's score minus the score of the
network trained alone with that seed, both on the drawn images: for Dice and accuracy the mean over the drawn images
of the per-image difference; AUC and balanced accuracy are computed again on the drawn images from the saved
predictions. The interval is the 2.5th to 97.5th percentile of the resampled gains.
"""

from __future__ import annotations

import csv
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medkd.training.evaluators import LOWER_IS_BETTER, metric_name

__all__ = [
    "RESAMPLES",
    "Gain",
    "Scorer",
    "mean_scorer",
    "classification_scorer",
    "image_scores",
    "bootstrap_interval",
    "gap_recovered",
    "method_gains",
    "gain_cells",
]

RESAMPLES = 2000  # bootstrap resamples of each interval
BOOTSTRAP_SEED = 0  # the generator's seed: reruns give the same intervals
PROBABILITIES = "probabilities.csv"  # each image's class probabilities (medkd.training.evaluators.ProbabilitiesCSV)

# image counts (resamples, images), each row how often each test image was drawn -> the score on each resample
Scorer = Callable[[np.ndarray], np.ndarray]


def mean_scorer(values: Sequence[float]) -> Scorer:
    """The scorer of a metric that is the mean of per-image scores (Dice, accuracy, HD95); images without a finite
    score (Dice without the class in the label map nor the prediction, an infinite HD95) are left out, as in the
    metric's mean in ``results.md``."""
    values = np.asarray(values, dtype=np.float64)
    scored = np.isfinite(values)
    filled = np.where(scored, values, 0.0)
    return lambda counts: (counts @ filled) / np.maximum(counts @ scored, 1e-12)


def _balanced_accuracy(right: np.ndarray, onehot: np.ndarray) -> Scorer:
    def score(counts: np.ndarray) -> np.ndarray:
        samples = counts @ onehot  # (resamples, classes)
        recall = (counts @ (onehot * right[:, None])) / np.where(samples > 0, samples, np.nan)
        return np.nanmean(recall, axis=1)  # over the classes present, as BalancedAccuracy

    return score


def _auc(probabilities: np.ndarray, onehot: np.ndarray) -> Scorer:
    """One-vs-rest ROC-AUC averaged over the classes with positive and negative images (PresentClassesROCAUC): per
    class, the weighted share of (positive, negative) pairs ranked right, ties counting one half."""
    pairs = []
    for c in range(onehot.shape[1]):
        positive = onehot[:, c] > 0
        if positive.any() and not positive.all():
            p, n = probabilities[positive, c], probabilities[~positive, c]
            pairs.append((positive, (p[:, None] > n[None, :]) + 0.5 * (p[:, None] == n[None, :])))

    def score(counts: np.ndarray) -> np.ndarray:
        per_class = []
        for positive, ranked in pairs:
            wp, wn = counts[:, positive], counts[:, ~positive]
            both = wp.sum(axis=1) * wn.sum(axis=1)
            per_class.append(((wp @ ranked) * wn).sum(axis=1) / np.where(both > 0, both, np.nan))
        return np.nanmean(per_class, axis=0) if per_class else np.full(len(counts), np.nan)

    return score


def classification_scorer(metric: str, probabilities: np.ndarray, labels: np.ndarray) -> Scorer:
    """The scorer of ``metric`` (``"auc"``, ``"acc"`` or ``"bacc"``) from each image's class ``probabilities``
    ``(images, classes)`` and class index ``labels``, computed as the evaluation computes it."""
    onehot = np.eye(probabilities.shape[1])[labels]
    right = (probabilities.argmax(axis=1) == labels).astype(np.float64)
    if metric == "auc":
        return _auc(probabilities, onehot)
    return mean_scorer(right) if metric == "acc" else _balanced_accuracy(right, onehot)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _probability_columns(columns: Sequence[str], network: str, networks: Sequence[str]) -> list[str]:
    """The columns ``<network>_<class>`` of ``network``: the probabilities come in one block per network, and a
    block belongs to the longest network name it starts with (``sp`` vs ``sp_big``)."""
    probabilities = [c for c in columns if c not in ("image", "label")]
    classes = len(probabilities) // max(len(networks), 1)
    blocks = [probabilities[i : i + classes] for i in range(0, len(probabilities), max(classes, 1))]
    for block in blocks:
        owner = max((n for n in networks if block[0].startswith(f"{n}_")), key=len, default=None)
        if owner == network and all(c.startswith(f"{network}_") for c in block):
            return block
    return []


def image_scores(eval_dir: Path, metric: str, network: str, networks: Sequence[str]) -> tuple[list[str], Scorer] | None:
    """The test images (in order) and the scorer of ``network``'s ``metric`` in an evaluation folder: from MONAI's
    per-case file ``val_<metric>_<network>_raw.csv`` (its ``mean`` column: the image's mean over the classes), or for
    classification from ``probabilities.csv`` (``networks``: those the evaluation scored); ``None`` when neither
    holds them (e.g. an evaluation from an older medkd)."""
    raw = eval_dir / f"{metric_name(metric, network)}_raw.csv"
    if raw.is_file():
        rows = _read_csv(raw)
        return [r["filename"] for r in rows], mean_scorer([float(r["mean"]) for r in rows])
    path = eval_dir / PROBABILITIES
    if metric not in ("auc", "acc", "bacc") or not path.is_file():
        return None
    rows = _read_csv(path)
    columns = _probability_columns(list(rows[0]) if rows else [], network, networks)
    if not columns or any(r.get("label") in (None, "") for r in rows):
        return None
    probabilities = np.array([[float(r[c]) for c in columns] for r in rows])
    labels = np.array([int(r["label"]) for r in rows])
    return [r["image"] for r in rows], classification_scorer(metric, probabilities, labels)


def bootstrap_interval(
    pairs: Sequence[tuple[Scorer, Scorer]],
    images: int,
    resamples: int = RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = 0.95,
) -> tuple[float, float]:
    """The ``level`` confidence interval of the gain of a method over the network trained alone: ``pairs`` holds one
    (method, alone) pair of scorers per seed, both scoring the same ``images`` test images in the same order. See the
    module's docstring for the procedure."""
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(images, np.full(images, 1.0 / images), size=resamples).astype(np.float64)
    seeds = rng.multinomial(len(pairs), np.full(len(pairs), 1.0 / len(pairs)), size=resamples)
    gains = np.stack([method(counts) - alone(counts) for method, alone in pairs], axis=1)  # (resamples, seeds)
    resampled = (gains * seeds).sum(axis=1) / len(pairs)
    tail = (1.0 - level) / 2 * 100
    low, high = np.nanpercentile(resampled, [tail, 100 - tail])
    return float(low), float(high)


def better(metric: str) -> int:
    """``1`` for a metric a better network raises (Dice, AUC), ``-1`` for one it lowers (HD95)."""
    return -1 if metric in LOWER_IS_BETTER else 1


def gap_recovered(distilled: float, alone: float, teacher: float, sign: int = 1) -> float | None:
    """The share of the teacher–student gap a method closes, ``(distilled - alone) / (teacher - alone)``; ``None``
    when the teacher does not score better than the student trained alone (no gap to close; ``sign``
    :func:`better`)."""
    gap = teacher - alone
    return (distilled - alone) / gap if sign * gap > 0 else None


@dataclass
class Gain:
    """One method's gain on one student network and metric, over the same network trained alone."""

    method: str
    network: str
    metric: str
    gains: list[float]  # per paired seed: the method's score minus the network's alone
    interval: tuple[float, float] | None  # 95 % bootstrap interval; None without per-image scores
    gap: float | None  # gap recovered; None without a teacher score above the network's alone

    @property
    def mean(self) -> float:
        """The mean gain over the paired seeds."""
        return statistics.mean(self.gains)

    @property
    def shown(self) -> bool | None:
        """Whether the interval leaves out 0 (a gain the test images and seeds show); None without an interval."""
        return None if self.interval is None else not self.interval[0] <= 0.0 <= self.interval[1]


Runs = Mapping[tuple[str, int], Path]  # the evaluation folder of each (preset, seed) run


def _value(row: Mapping, metric: str) -> float | None:
    return None if row.get(metric) in (None, "") else float(row[metric])


def _run_scores(row: Mapping, metric: str, rows: Sequence[Mapping], evals: Runs) -> tuple[list[str], Scorer] | None:
    """The per-image scores of the network of ``row`` in its run's evaluation folder, if saved."""
    eval_dir = evals.get((row["preset"], row["seed"]))
    if eval_dir is None:
        return None
    networks = [str(r["network"]) for r in rows if (r["preset"], r["seed"]) == (row["preset"], row["seed"])]
    return image_scores(Path(eval_dir), metric, str(row["network"]), networks)


def _interval(
    metric: str, pairs: Sequence[tuple[Mapping, Mapping]], rows: Sequence[Mapping], evals: Runs
) -> tuple[float, float] | None:
    """The bootstrap interval of a gain from the per-image scores of its paired runs; None where a run lacks them or
    the runs were scored on other test images."""
    scored = [(_run_scores(r, metric, rows, evals), _run_scores(a, metric, rows, evals)) for r, a in pairs]
    images = scored[0][0][0] if scored[0][0] else None
    if images is None or any(m is None or a is None or not m[0] == a[0] == images for m, a in scored):
        return None
    return bootstrap_interval([(m[1], a[1]) for m, a in scored], len(images))


def method_gains(rows: Sequence[Mapping], metrics: Sequence[str], evals: Runs, baseline: str) -> list[Gain]:
    """Each method's :class:`Gain` per network and metric over the ``baseline`` preset (the students trained alone),
    paired by network and seed; the teacher's row (preset ``"-"``) gives the gap. ``rows``: one per preset, seed and
    network, as :func:`medkd.tools.compare.compare` returns them; ``evals``: where each run's per-image scores are."""
    alone = {(r["network"], r["seed"]): r for r in rows if r["preset"] == baseline}
    teacher = next((r for r in rows if r["preset"] == "-"), {})
    groups: dict[tuple[str, str], list[tuple[Mapping, Mapping]]] = {}
    for r in rows:
        if r["preset"] not in ("-", baseline) and (r["network"], r["seed"]) in alone:
            groups.setdefault((str(r["preset"]), str(r["network"])), []).append((r, alone[(r["network"], r["seed"])]))
    found = []
    for metric in metrics:
        for (method, network), pairs in groups.items():
            scored = [(r, a) for r, a in pairs if _value(r, metric) is not None and _value(a, metric) is not None]
            if not scored:
                continue
            method_scores, alone_scores = ([_value(row, metric) for row in side] for side in zip(*scored, strict=True))
            reference = _value(teacher, metric)
            gap = None if reference is None else gap_recovered(
                statistics.mean(method_scores), statistics.mean(alone_scores), reference, better(metric)
            )  # fmt: skip
            gains = [m - a for m, a in zip(method_scores, alone_scores, strict=True)]
            found.append(Gain(method, network, metric, gains, _interval(metric, scored, rows, evals), gap))
    return found


def gain_cells(gain: Gain) -> dict[str, str]:
    """The columns of ``gain`` in a ``results.md`` gain table (see :data:`medkd.tools.report.GAINS_LEGEND`)."""
    spread = f" ± {statistics.stdev(gain.gains):.4f}" if len(gain.gains) > 1 else ""
    mark = " (n.s.)" if gain.shown is False else ""
    interval = "–" if gain.interval is None else f"[{gain.interval[0]:+.4f}, {gain.interval[1]:+.4f}]"
    return {
        "gain": f"{gain.mean:+.4f}{spread}{mark}",
        "95% CI": interval,
        "seeds won": f"{sum(better(gain.metric) * g > 0 for g in gain.gains)}/{len(gain.gains)}",
        "gap recovered": "–" if gain.gap is None else f"{gain.gap:.0%}",
    }
