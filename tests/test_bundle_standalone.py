"""A bundle folder copied alone (no other bundle beside it) runs every stage with the commands its docs/README.md
shows: the teacher, the distillation, the evaluation, the inference (``configs/inference.json`` alone, as in the
model zoo) and the model-zoo tools on the deployed network (``verify_net_in_out``, ``ckpt_export``, ``onnx_export``,
parsed by MONAI's own ``fire`` call in this process, in the folder: a fresh interpreter each doubled the test's
time), on tiny data.

segmentation_3d stands for the 3D bundles and segmentation, classification_2d for the 2D bundles and classification
(42 s and 55 s on one core); the others are generated the same way (tests/test_bundle_generation.py checks each
generated file against its sources).
"""

import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import torch
from bundle_utils import (
    BUNDLES,
    ONNX_AXES,
    REPO,
    TINY,
    TORCHSCRIPT,
    VERIFY,
    deployed_network,
    latest_run,
    onnx_command,
    run_zoo_command,
)

from medkd.bundles import TEACHER_CHECKPOINT, checkpoint_file, run_command
from medkd.tools.deploy import onnx_available

KEPT = shutil.ignore_patterns("data", "models", "eval", "runs", "source")  # the folder as shipped, its runs left out
INFERENCE = "python -m monai.bundle run --config_file configs/inference.json"  # the model zoo's command
SHAPES = {2: [(1, 1, 32, 32), (2, 1, 48, 64)], 3: [(1, 1, 16, 16, 16), (1, 1, 16, 24, 32)]}  # inputs of the exports


def run_in(folder, command, **overrides):
    """The README ``command`` (``python -m monai.bundle ...``) with the ``overrides``, typed in ``folder``."""
    arguments = shlex.split(command)
    assert arguments[0] == "python", command
    options = [token for key, value in overrides.items() for token in (f"--{key}", json.dumps(value))]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, *arguments[1:], *options],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def check_model_zoo_commands(bundle, folder, monkeypatch):
    """The README's ``verify_net_in_out`` passes in ``folder``, and its ``ckpt_export`` and ``onnx_export`` (when onnx
    is installed) give the deployed network's outputs (ONNX at another input size too)."""
    network = deployed_network(folder, folder)
    shapes = SHAPES[3 if bundle.endswith("_3d") else 2]
    run_zoo_command(folder, VERIFY, monkeypatch)
    run_zoo_command(folder, TORCHSCRIPT, monkeypatch)
    with torch.no_grad():
        x = torch.rand(shapes[0])
        torch.testing.assert_close(torch.jit.load(folder / "models" / "model.ts")(x), network(x))
    if not onnx_available():  # in the dev extra, which CI installs (tests/test_bundle_properties.py insists)
        return
    import onnxruntime

    run_zoo_command(folder, onnx_command(bundle), monkeypatch)
    session = onnxruntime.InferenceSession(str(folder / "models" / "model.onnx"), providers=["CPUExecutionProvider"])
    for shape in shapes:
        x = torch.rand(shape)
        with torch.no_grad():
            expected = network(x).numpy()
        torch.testing.assert_close(session.run(None, {"image": x.numpy()})[0], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bundle", ["segmentation_3d", "classification_2d"])
def test_a_bundle_folder_copied_alone_runs_every_stage_and_exports(bundle, tmp_path, monkeypatch):
    folder = shutil.copytree(BUNDLES / bundle, tmp_path / bundle, ignore=KEPT)
    tiny = {**TINY[bundle], "max_epochs": 1}
    run_in(folder, run_command(folder, "train_teacher"), **tiny)
    assert (folder / "models" / TEACHER_CHECKPOINT).is_file()
    run_in(folder, run_command(folder, "train"), **tiny)
    assert all((folder / "models" / checkpoint_file(name)).is_file() for name in ("sp", "sf"))
    run_in(folder, run_command(folder, "evaluate"), **tiny)
    results = json.loads((folder / "eval" / "results.json").read_text())
    assert {row["network"] for row in results} >= {"teacher", "sp", "sf"}
    assert run_command(folder, "inference") == INFERENCE
    run_in(folder, INFERENCE, **tiny)
    written = latest_run(folder / "eval" / ("segmentations" if bundle.startswith("segmentation") else "predictions"))
    assert list(written.iterdir())
    assert bundle in ONNX_AXES, f"{bundle}'s README shows no model-zoo export commands"
    check_model_zoo_commands(bundle, folder, monkeypatch)
