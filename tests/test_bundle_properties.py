"""The 2D bundles as MONAI's workflows and model-zoo tools see them: every stage's ``check_properties()``, and
``verify_net_in_out``, ``ckpt_export`` and ``onnx_export`` of the deployed network (``network_def``, weights in
``models/model.pt``) run as each bundle's docs/README.md writes them, on tiny trained weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from bundle_utils import (
    BUNDLES,
    EVERY_BUNDLE,
    TINY,
    TORCHSCRIPT,
    VERIFY,
    deployed_network,
    native_spacing,
    onnx_command,
    run_zoo_command,
)
from ignite.engine import Engine

from medkd.bundles import stage_workflow
from medkd.errors import ConfigError
from medkd.runtime.files import load_checkpoint
from medkd.tools.deploy import onnx_available
from medkd.tools.export import MODEL_FILE, DeployedModel, same_weights

BUNDLE_NAMES = ("segmentation_2d", "classification_2d")


def missing_properties(bundle: str, stage: str, root: Path, run: bool = False) -> list[str]:
    """What MONAI's ``check_properties()`` finds missing in ``stage`` of ``bundle`` (tiny data, the student alone,
    one epoch) in ``root``, after initialising it, and running it if ``run``."""
    settings = {**TINY[bundle], "max_epochs": 1, "routes_preset": "student", **native_spacing(bundle)}
    workflow = stage_workflow(BUNDLES / bundle, stage, bundle_root=str(root), **settings)
    workflow.initialize()
    if run:
        workflow.run()
    return workflow.check_properties()


@pytest.fixture(scope="module", params=BUNDLE_NAMES)
def trained(request, tmp_path_factory) -> tuple[str, Path, dict]:
    """A bundle folder (the bundle's configs, tiny data) after one epoch of distillation (the student alone, to be
    quick), and what ``check_properties()`` finds missing in each stage."""
    bundle = request.param
    root = tmp_path_factory.mktemp(bundle)
    shutil.copytree(BUNDLES / bundle / "configs", root / "configs")
    missing = {stage: missing_properties(bundle, stage, root, run=stage == "train")
               for stage in ("train_teacher", "train", "evaluate", "inference")}  # fmt: skip
    return bundle, root, missing


def test_every_stage_has_the_properties_monai_requires(trained):
    bundle, _, missing = trained
    assert missing == {stage: [] for stage in missing}, bundle


def test_the_distillation_writes_the_chosen_network_to_model_pt(trained):
    _, root, _ = trained
    best = load_checkpoint(root / "models" / "sp.pt")["sp"]
    assert same_weights(torch.load(root / "models" / MODEL_FILE, weights_only=True), best)


def test_verify_net_in_out_with_the_metadata(trained, monkeypatch):
    bundle, root, _ = trained
    run_zoo_command(root, VERIFY, monkeypatch)  # raises on other output channels or types than the metadata's


def test_torchscript_export_matches_the_deployed_network(trained, monkeypatch):
    bundle, root, _ = trained
    run_zoo_command(root, TORCHSCRIPT, monkeypatch)
    x, network = torch.rand(2, 1, 32, 48), deployed_network(BUNDLES / bundle, root)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(root / "models" / "model.ts")(x), network(x))


def test_onnx_export_matches_the_deployed_network_at_other_sizes(trained, monkeypatch):
    assert onnx_available(), 'onnx and onnxruntime are in the dev extra (pip install -e ".[dev]"), which CI installs'
    import onnxruntime

    bundle, root, _ = trained
    run_zoo_command(root, onnx_command(bundle), monkeypatch)
    session = onnxruntime.InferenceSession(str(root / "models" / "model.onnx"), providers=["CPUExecutionProvider"])
    network = deployed_network(BUNDLES / bundle, root)
    for shape in ((1, 1, 32, 32), (2, 1, 48, 64)):
        x = torch.rand(shape)
        with torch.no_grad():
            expected = network(x).numpy()
        torch.testing.assert_close(session.run(None, {"image": x.numpy()})[0], expected, rtol=1e-4, atol=1e-4)


def test_the_readme_shows_the_commands_the_tests_run():
    for bundle in EVERY_BUNDLE:  # the 3D bundles': tests/test_bundle_standalone.py
        readme = (BUNDLES / bundle / "docs" / "README.md").read_text(encoding="utf-8")
        for command in (VERIFY, TORCHSCRIPT, onnx_command(bundle)):
            assert command in readme, (bundle, command)


def _best_checkpoint(folder: Path, name: str, value: float) -> dict:
    weights = {"weight": torch.full((2, 2), value)}
    torch.save({name: weights, "metric": 0.5, "epoch": 1}, folder / f"{name}.pt")
    return weights


def test_model_pt_of_other_weights_is_set_aside_and_of_the_same_left(tmp_path):
    handler = DeployedModel(str(tmp_path), "sf", ["teacher", "sp", "sf"])
    first = _best_checkpoint(tmp_path, "sf", 1.0)
    handler(Engine(lambda e, b: None))
    assert same_weights(torch.load(tmp_path / MODEL_FILE, weights_only=True), first)
    handler(Engine(lambda e, b: None))  # the same weights: nothing set aside
    assert sorted(p.name for p in tmp_path.iterdir()) == [MODEL_FILE, "sf.pt"]
    second = _best_checkpoint(tmp_path, "sf", 2.0)
    handler(Engine(lambda e, b: None))
    assert same_weights(torch.load(tmp_path / MODEL_FILE, weights_only=True), second)
    (aside,) = [p for p in tmp_path.iterdir() if p.name not in (MODEL_FILE, "sf.pt")]
    assert aside.name.startswith("model.") and same_weights(torch.load(aside, weights_only=True), first)


def test_an_unreadable_model_pt_is_set_aside(tmp_path):
    (tmp_path / MODEL_FILE).write_text("not weights")
    weights = _best_checkpoint(tmp_path, "sp", 1.0)
    DeployedModel(str(tmp_path), "sp", ["sp"])(Engine(lambda e, b: None))
    assert same_weights(torch.load(tmp_path / MODEL_FILE, weights_only=True), weights)
    assert [p.read_text() for p in tmp_path.glob("model.*.pt")] == ["not weights"]


def test_the_ensemble_cannot_be_deployed():
    with pytest.raises(ConfigError, match="network_name 'ensemble'"):
        DeployedModel("models", "ensemble", ["teacher", "sp", "sf"])


@pytest.mark.parametrize("bundle", ["segmentation_3d", "classification_3d"])
def test_the_generated_3d_bundles_have_the_properties_monai_requires(bundle, tmp_path):
    shutil.copytree(BUNDLES / bundle / "configs", tmp_path / "configs")
    for stage in ("train", "evaluate", "inference"):
        assert missing_properties(bundle, stage, tmp_path) == [], (bundle, stage)
