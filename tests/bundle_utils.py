"""Run bundle stages in-process with MONAI's ConfigWorkflow, on tiny generated data."""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fire
import pytest
import torch
from monai.bundle import ConfigWorkflow, ckpt_export, onnx_export, verify_net_in_out

from medkd.bundles import METADATA, stage_config, stage_files, stage_workflow
from medkd.tools.export import MODEL_FILE

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
SCHEMA = BUNDLES / "meta_schema_20240725.json"  # MONAI's metadata schema, shipped for offline checks
BASE = BUNDLES / "segmentation_2d" / "configs"

EVERY_BUNDLE = ("segmentation_2d", "segmentation_3d", "classification_2d", "classification_3d")
# per bundle: the config files each stage merges, the stages in the order a user runs them
STAGES = {
    bundle: {
        stage: stage_files(BUNDLES / bundle, stage) for stage in ("train_teacher", "train", "evaluate", "inference")
    }
    for bundle in EVERY_BUNDLE
}

TINY = {
    "segmentation_2d": {
        "make_default_data": "$medkd.data.synthetic.ensure_segmentation_data(@dataset_dir, spatial_dims=2, size=48, "
        "counts=(4, 2, 2))",
        "patch_size": [32, 32],
        "batch_size": 2,
        "iterations_per_epoch": None,
    },
    "segmentation_3d": {
        "make_default_data": "$medkd.data.synthetic.ensure_segmentation_data(@dataset_dir, spatial_dims=3, size=32, "
        "counts=(2, 1, 1))",
        "patch_size": [16, 16, 16],
        "samples_per_volume": 1,
    },
    "classification_2d": {
        "make_default_data": (
            "$medkd.data.synthetic.ensure_classification_data(@dataset_dir, size=32, counts=(16, 8, 8))"
        ),
        "patch_size": [32, 32],
        "batch_size": 4,
    },
    "classification_3d": {
        "make_default_data": (
            "$medkd.data.synthetic.ensure_classification_data(@dataset_dir, size=32, counts=(8, 4, 4), spatial_dims=3)"
        ),
        "patch_size": [32, 32, 32],  # DenseNet-121 pools to 1/32
        "batch_size": 4,
    },
}


CONFIGS = "--config_file configs/inference.json --meta_file configs/metadata.json"  # inference.json runs alone
# the model-zoo commands of each bundle's docs/README.md ("Model-zoo commands"), typed in the bundle folder
VERIFY = f"python -m monai.bundle verify_net_in_out network_def {CONFIGS}"
TORCHSCRIPT = f"python -m monai.bundle ckpt_export network_def --filepath models/model.ts {CONFIGS}"
SIZES = {2: "{0: 'batch', 2: 'height', 3: 'width'}", 3: "{0: 'batch', 2: 'depth', 3: 'height', 4: 'width'}"}
ONNX_AXES = {  # the dynamic axes of onnx_export: the classifier's output has no spatial ones
    "segmentation_2d": f"{{'image': {SIZES[2]}, 'pred': {SIZES[2]}}}",
    "segmentation_3d": f"{{'image': {SIZES[3]}, 'pred': {SIZES[3]}}}",
    "classification_2d": f"{{'image': {SIZES[2]}, 'pred': {{0: 'batch'}}}}",
    "classification_3d": f"{{'image': {SIZES[3]}, 'pred': {{0: 'batch'}}}}",
}


def onnx_command(bundle: str) -> str:
    """The ``onnx_export`` command of ``bundle``'s README: batch and spatial sizes dynamic, the TorchScript-based
    exporter (several times faster than dynamo's, and exports MONAI's networks)."""
    axes = ONNX_AXES[bundle]
    kwargs = f"{{'input_names': ['image'], 'output_names': ['pred'], 'dynamic_axes': {axes}, 'dynamo': False}}"
    return (f"python -m monai.bundle onnx_export network_def --filepath models/model.onnx --ckpt_file models/model.pt "
            f'{CONFIGS} --use_trace True --converter_kwargs "{kwargs}"')  # fmt: skip


def run_zoo_command(root: Path, command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run a README command of ``python -m monai.bundle`` (``verify_net_in_out``, ``ckpt_export``, ``onnx_export``)
    in ``root``, parsed by the same ``fire`` call, in this process (a fresh interpreter per command took minutes);
    MONAI's commands raise on any mismatch."""
    args = shlex.split(command)
    assert args[:3] == ["python", "-m", "monai.bundle"], command
    monkeypatch.chdir(root)
    commands = {"verify_net_in_out": verify_net_in_out, "ckpt_export": ckpt_export, "onnx_export": onnx_export}
    fire.Fire(commands, command=args[3:])


def deployed_network(bundle_dir: Path, root: Path) -> torch.nn.Module:
    """``network_def`` of the inference stage of the bundle in ``bundle_dir`` run in ``root``, with the weights of
    ``models/model.pt`` there."""
    network = stage_config(bundle_dir, "inference", {"bundle_root": str(root)}).get_parsed_content("network_def")
    network.load_state_dict(torch.load(root / "models" / MODEL_FILE, weights_only=True))
    return network.eval()


def native_spacing(bundle: str) -> dict:
    """Overrides that keep a segmentation bundle's tiny images at their own 1.0 spacing (the bundles resample to
    their planned one, which makes the images several times larger): for tests of wiring, not of resampling."""
    return {"pixdim": [1.0, 1.0]} if bundle == "segmentation_2d" else {}


def tiny_overlay(bundle: str, path: Path, **extra) -> Path:
    """Write the tiny-data settings of ``bundle`` (plus ``extra``) as a config file to merge on the command line."""
    path.write_text(json.dumps({**TINY[bundle], **extra}))
    return path


def stage_command(bundle: str, stage: str, root: Path, *extra_configs: Path, **overrides) -> list[str]:
    """The ``python -m monai.bundle run`` command line of a stage, as a user types it (for subprocess tests)."""
    files = [str(p) for p in STAGES[bundle][stage]] + [str(p) for p in extra_configs]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", json.dumps(files), "--bundle_root", str(root)]
    cmd += ["--meta_file", str(BUNDLES / bundle / METADATA)]
    for key, value in overrides.items():
        cmd += [f"--{key}", json.dumps(value)]
    return cmd


def run_stage(bundle: str, stage: str, root: Path, **overrides) -> ConfigWorkflow:
    """Initialise and run one stage of ``bundle`` with ``bundle_root=root``; return the workflow."""
    settings = {**TINY[bundle], "max_epochs": 1, **overrides}
    workflow = stage_workflow(BUNDLES / bundle, stage, bundle_root=str(root), **settings)
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return workflow


def latest_run(output_dir: Path) -> Path:
    """The run folder of the last inference into ``output_dir``, as its ``latest.txt`` names it."""
    from medkd.tools.outputs import LATEST

    return output_dir / (output_dir / LATEST).read_text().strip()


def mlflow_metrics(root: Path) -> list[set[str]]:
    """The metric names of every run in the local MLflow store that ``--tracking mlflow`` writes under ``root``."""
    import mlflow  # a dev dependency (pip install -e ".[dev]")

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{root / 'eval' / 'mlruns.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    return [set(r.data.metrics) for r in runs]


def every_stage_with(bundle: str, root: Path, option: dict, applied: Callable[[Any], bool], reset=None) -> None:
    """Run ``bundle``'s stages with the engine ``option`` given on the command line (e.g. ``{"compile": True}``):
    the teacher stage, distillation, evaluation and inference must apply it to their networks (``applied(network)``),
    and evaluating the same checkpoints with and without it must give the same scores. ``reset()`` runs before each
    evaluation (e.g. ``torch._dynamo.reset``)."""
    plain = native_spacing(bundle)
    settings = {**option, **plain}
    trainer = run_stage(bundle, "train_teacher", root, **settings).parser.get_parsed_content("train#trainer")
    assert applied(trainer.network)
    trainer = run_stage(bundle, "train", root, **settings).parser.get_parsed_content("train#trainer")
    assert all(applied(net) for net in trainer.networks.values())
    results = {}
    for with_option in (False, True):
        if reset is not None:
            reset()
        evaluator = run_stage(bundle, "evaluate", root, **(settings if with_option else plain))
        networks = evaluator.parser.get_parsed_content("evaluator").networks.values()
        assert all(applied(net) == with_option for net in networks)
        results[with_option] = json.loads((root / "eval" / "results.json").read_text())
    for without, row in zip(results[False], results[True], strict=True):
        scores = {k: v for k, v in without.items() if isinstance(v, float)}
        assert scores and {k: row[k] for k in scores} == pytest.approx(scores, rel=1e-5), row["network"]
    evaluator = run_stage(bundle, "inference", root, **settings).parser.get_parsed_content("evaluator")
    assert applied(evaluator.network)
