"""Every bundle folder copied alone (no other bundle beside it) runs every stage with the commands its docs/README.md
shows: the teacher, the distillation, the evaluation, the inference (``configs/inference.json`` alone, as in the
model zoo) and the model-zoo tools on the deployed network (``verify_net_in_out``, ``ckpt_export``, ``onnx_export``,
parsed by MONAI's own ``fire`` call in this process, in the folder: a fresh interpreter each doubled the test's
time), on tiny data.

The four bundles run at once, each bundle's stages in order, each stage a single-threaded process forked from a
server that imported MONAI once (its import was about 8 of a stage's 11 s on the tiny data), while the model-zoo
tools run here on the bundles done first: 47 to 61 s on two cores shared with other jobs, against 91 to 94 s for
segmentation_3d and classification_2d one after the other, a fresh interpreter per stage.
"""

import json
import multiprocessing
import os
import runpy
import shlex
import shutil
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from bundle_utils import (
    BUNDLES,
    EVERY_BUNDLE,
    ONNX_AXES,
    STAGES,
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
SHAPES = {  # inputs of the exports: sizes the U-Nets' strides divide, DenseNet-121 pools to 1/32
    "segmentation_2d": [(1, 1, 32, 32), (2, 1, 48, 64)],
    "segmentation_3d": [(1, 1, 16, 16, 16), (1, 1, 16, 24, 32)],
    "classification_2d": [(1, 1, 32, 32), (2, 1, 48, 64)],
    "classification_3d": [(1, 1, 32, 32, 32), (2, 1, 32, 32, 64)],
}
# TINY's whole epoch (None) is no number on the command line: one pass over segmentation_2d's 4 images at batch 2
COMMAND_LINE = {"segmentation_2d": {"iterations_per_epoch": 2}}
TIMEOUT = 600  # seconds a stage may take, four at once on two cores
# each stage is a process forked from a server that imported MONAI, medkd and torch._dynamo (a stage imports it) once
SERVER = multiprocessing.get_context("forkserver")
SERVER.set_forkserver_preload(["monai.bundle", "torch._dynamo", "medkd.bundles", "medkd.training.engines"])


def stage_process(folder: Path, arguments: list[str], log: Path) -> None:
    """What ``python -m monai.bundle <arguments>`` typed in ``folder`` runs (``runpy``, ``sys.argv``, the working
    directory first on ``sys.path``), in a process of its own, on one thread, its output written to ``log``."""
    with open(log, "w", encoding="utf-8") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
    os.chdir(folder)
    sys.path.insert(0, str(folder))
    torch.set_num_threads(1)
    sys.argv = [sys.argv[0], *arguments]
    try:
        runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
    except Exception:  # as the interpreter ends on one: medkd's one-line ERROR for a user's mistake, exit status 1
        sys.excepthook(*sys.exc_info())
        sys.exit(1)


def run_in(folder: Path, command: str, log: Path, **overrides) -> str | None:
    """The README ``command`` (``python -m monai.bundle ...``) with the ``overrides``, typed in ``folder`` (a process
    forked from :data:`SERVER`): ``None`` when it succeeds, else how it failed (the tail of its output in ``log``)."""
    arguments = shlex.split(command)
    assert arguments[:3] == ["python", "-m", "monai.bundle"], command
    options = [token for key, value in overrides.items() for token in (f"--{key}", json.dumps(value))]
    process = SERVER.Process(target=stage_process, args=(folder, [*arguments[3:], *options], log))
    process.start()
    process.join(TIMEOUT)
    if process.exitcode is None:
        process.kill()
        process.join()
        return f"still running after {TIMEOUT} s"
    tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
    return None if process.exitcode == 0 else f"exit status {process.exitcode}:\n{tail}"


def run_stages(bundle: str, folder: Path) -> str | None:
    """Run ``bundle``'s stages one after the other in ``folder`` with its README commands and tiny settings (one
    epoch): ``None`` when all succeed, else which stage failed first, and how."""
    tiny = {**TINY[bundle], "max_epochs": 1, **COMMAND_LINE.get(bundle, {})}
    for stage in STAGES[bundle]:
        command = run_command(folder, stage)
        failure = run_in(folder, command, folder.parent / f"{stage}.log", **tiny)
        if failure is not None:
            return f"{bundle}: the {stage} stage ({command}) failed, {failure}"
    return None


def selected_bundles(request: pytest.FixtureRequest) -> list[str]:
    """The bundles of this module's tests that the session runs (``-k`` may leave some out)."""
    items = [item for item in request.session.items if item.path == request.path and hasattr(item, "callspec")]
    return [item.callspec.params["bundle"] for item in items]


@pytest.fixture(scope="module")
def stages_run(request, tmp_path_factory) -> Iterator[dict[str, tuple[Path, Future]]]:
    """Each bundle copied alone into an empty folder, and its stages running there (:func:`run_stages`), all bundles
    at once: per bundle, the folder and the future of the stages' failure (``None``)."""
    bundles = selected_bundles(request)
    with ThreadPoolExecutor(max_workers=len(bundles)) as pool:
        runs = {}
        for bundle in bundles:
            folder = shutil.copytree(BUNDLES / bundle, tmp_path_factory.mktemp(bundle) / bundle, ignore=KEPT)
            runs[bundle] = folder, pool.submit(run_stages, bundle, folder)
        yield runs


def check_model_zoo_commands(bundle, folder, monkeypatch):
    """The README's ``verify_net_in_out`` passes in ``folder``, and its ``ckpt_export`` and ``onnx_export`` (when onnx
    is installed) give the deployed network's outputs (ONNX at another input size too)."""
    network = deployed_network(folder, folder)
    shapes = SHAPES[bundle]
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


@pytest.mark.parametrize("bundle", EVERY_BUNDLE)
def test_a_bundle_folder_copied_alone_runs_every_stage_and_exports(bundle, stages_run, monkeypatch):
    folder, stages = stages_run[bundle]
    if stages.result() is not None:
        pytest.fail(stages.result(), pytrace=False)
    assert (folder / "models" / TEACHER_CHECKPOINT).is_file()
    assert all((folder / "models" / checkpoint_file(name)).is_file() for name in ("sp", "sf"))
    results = json.loads((folder / "eval" / "results.json").read_text())
    assert {row["network"] for row in results} >= {"teacher", "sp", "sf"}
    assert run_command(folder, "inference") == INFERENCE
    written = latest_run(folder / "eval" / ("segmentations" if bundle.startswith("segmentation") else "predictions"))
    assert list(written.iterdir())
    assert bundle in ONNX_AXES, f"{bundle}'s README shows no model-zoo export commands"
    check_model_zoo_commands(bundle, folder, monkeypatch)
