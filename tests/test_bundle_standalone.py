"""A bundle folder copied alone (no other bundle beside it) runs every stage through ``python -m monai.bundle run``:
the teacher, the distillation, the evaluation and the inference, on tiny data.

segmentation_3d stands for the generated bundles (classification_3d is generated the same way, from
classification_2d); classification_2d for a hand-edited bundle whose teacher stage file is generated (from
segmentation_2d's). segmentation_2d holds only hand-edited files of its own.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
from bundle_utils import BUNDLES, REPO, TINY, latest_run

from medkd.bundles import TEACHER_CHECKPOINT, checkpoint_file, run_arguments, runs_alone

KEPT = shutil.ignore_patterns("data", "models", "eval", "runs", "source")  # the folder as shipped, its runs left out


def run_in(folder, arguments, **overrides):
    """``python -m monai.bundle run`` with ``arguments`` and the ``overrides``, typed in ``folder``."""
    options = [token for key, value in overrides.items() for token in (f"--{key}", json.dumps(value))]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", *arguments, *options],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]


# segmentation_3d stands for every generated bundle (the others are made the same way, and
# tests/test_bundle_generation.py checks each generated file against its sources): one run keeps the suite short
@pytest.mark.parametrize("bundle", ["segmentation_3d"])
def test_a_bundle_folder_copied_alone_runs_every_stage(bundle, tmp_path):
    folder = shutil.copytree(BUNDLES / bundle, tmp_path / bundle, ignore=KEPT)
    tiny = {**TINY[bundle], "max_epochs": 1}
    run_in(folder, run_arguments(folder, "train_teacher"), **tiny)
    assert (folder / "models" / TEACHER_CHECKPOINT).is_file()
    run_in(folder, run_arguments(folder, "train"), **tiny)
    assert all((folder / "models" / checkpoint_file(name)).is_file() for name in ("sp", "sf"))
    run_in(folder, run_arguments(folder, "evaluate"), **tiny)
    results = json.loads((folder / "eval" / "results.json").read_text())
    assert {row["network"] for row in results} >= {"teacher", "sp", "sf"}
    inference = folder / "configs" / "inference.json"
    alone = runs_alone(inference)  # the generated bundles' inference.json runs without train.json
    assert alone == (bundle == "segmentation_3d")
    run_in(folder, ["--config_file", "configs/inference.json"] if alone else run_arguments(folder, "inference"), **tiny)
    written = latest_run(folder / "eval" / ("segmentations" if bundle.startswith("segmentation") else "predictions"))
    assert list(written.iterdir())
