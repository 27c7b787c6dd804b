"""Where the evaluation and inference stages write, so that no run replaces an earlier one's results.

Inference writes each invocation into a folder of its own, ``<output_dir>/<YYYYmmdd-HHMMSS>_<network>/``
(:func:`new_run_folder`), and names the last complete one in ``<output_dir>/latest.txt`` (:class:`LatestRun`): a
second invocation with other inputs never overwrites the first one's files, and an input it skips leaves nothing of
an earlier run beside its outputs. Evaluation writes into its ``output_dir`` as before, after setting the previous
evaluation's files aside with a timestamp (:func:`set_aside_evaluation`), as a fresh training start does with
checkpoints (:func:`medkd.training.previous.keep_previous`, the one policy); a fresh training start sets these
aside too (:func:`evaluation_files` with the inference folder).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from ignite.engine import Engine, Events

from medkd.bundles import RESULTS_JSON, RESULTS_MD
from medkd.tools.class_pictures import CONFUSION_PNG, ROC_PNG
from medkd.tools.overlays import OVERLAYS_DIR
from medkd.training.postprocessing import POSTPROCESSING_JSON
from medkd.training.previous import keep_previous, numbered

__all__ = [
    "EVALUATION_FILES",
    "EVALUATION_FOLDERS",
    "LATEST",
    "evaluation_files",
    "set_aside_evaluation",
    "new_run_folder",
    "LatestRun",
]

logger = logging.getLogger("medkd.tools.outputs")

# what the evaluation stage writes into its output_dir: the results table, MONAI's MetricsSaver files (the metrics,
# per case and per class), the post-processing chosen on the validation images, a classifier's per-image
# probabilities and pictures, and a segmentation's overlays folder
EVALUATION_FILES = (
    RESULTS_JSON, RESULTS_MD, "metrics.csv", "*_raw.csv", "*_summary.csv", "probabilities.csv", ROC_PNG,
    CONFUSION_PNG.format("*"), POSTPROCESSING_JSON,
)  # fmt: skip
EVALUATION_FOLDERS = (OVERLAYS_DIR,)
LATEST = "latest.txt"  # in an inference output_dir: the name of its last complete run folder


def evaluation_files(output_dir: str | os.PathLike, *inference: str) -> list[Path]:
    """The files of :data:`EVALUATION_FILES` in ``output_dir``, and its folders of :data:`EVALUATION_FOLDERS` and
    ``inference`` (e.g. ``"segmentations"``) that exist: what a fresh training start sets aside, its results being of
    other networks."""
    root = Path(output_dir)
    found = [path for pattern in EVALUATION_FILES for path in sorted(root.glob(pattern)) if path.is_file()]
    return found + [root / name for name in (*EVALUATION_FOLDERS, *inference) if (root / name).exists()]


def set_aside_evaluation(output_dir: str | os.PathLike) -> None:
    """Set the previous evaluation's files in ``output_dir`` aside with a timestamp (``results.md`` ->
    ``results.20261207-151500.md``) and a warning saying where, before an evaluation writes new ones."""
    keep_previous(evaluation_files(output_dir), "evaluating again")


def new_run_folder(output_dir: str | os.PathLike, network_name: str) -> str:
    """Create and return ``<output_dir>/<YYYYmmdd-HHMMSS>_<network_name>``, a folder no earlier invocation wrote
    (``-1``, ``-2``, ... appended when one of that name exists)."""
    stem = Path(output_dir) / f"{time.strftime('%Y%m%d-%H%M%S')}_{network_name}"
    return str(next(folder for folder in numbered(stem) if _created(folder)))


def _created(folder: Path) -> bool:
    """Create ``folder`` (and its parents); whether it was new (``False`` when another run made it first)."""
    try:
        folder.mkdir(parents=True)
    except FileExistsError:
        return False
    return True


class LatestRun:
    """At the end of an inference run, write the name of its folder (:func:`new_run_folder`) into ``latest.txt``
    beside it and log where its outputs are; a run that fails leaves ``latest.txt`` naming the last complete one.

    Args:
        run_dir: the run's folder.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)

    def attach(self, engine: Engine) -> None:
        """Write at ``Events.COMPLETED`` of ``engine``."""
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        (self.run_dir.parent / LATEST).write_text(self.run_dir.name + "\n", encoding="utf-8")
        logger.info("outputs written to %s (named in %s)", self.run_dir, self.run_dir.parent / LATEST)
