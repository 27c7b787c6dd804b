"""Run bundle stages in-process with MONAI's ConfigWorkflow, on tiny generated data."""

from __future__ import annotations

from pathlib import Path

from monai.bundle import ConfigWorkflow

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
SCHEMA = Path(__file__).parent / "data" / "bundle_metadata_schema.json"
BASE = BUNDLES / "segmentation_2d" / "configs"

# per bundle: the config files each stage merges, in order (3D overlays the 2D bundle's configs)
STAGES = {
    "segmentation_2d": {
        "train_teacher": [BASE / "train.json", BASE / "train_teacher.json"],
        "train": [BASE / "train.json"],
        "evaluate": [BASE / "train.json", BASE / "evaluate.json"],
        "inference": [BASE / "train.json", BASE / "inference.json"],
    },
}
_3D = BUNDLES / "segmentation_3d" / "configs" / "train.json"
STAGES["segmentation_3d"] = {k: v[:1] + [_3D] + v[1:] for k, v in STAGES["segmentation_2d"].items()}

TINY = {
    "segmentation_2d": {
        "make_default_data": "$medkd.synthetic.ensure_segmentation_data(@dataset_dir, spatial_dims=2, size=48, "
        "counts=(4, 2, 2))",
        "patch_size": [32, 32],
        "batch_size": 2,
    },
    "segmentation_3d": {
        "make_default_data": "$medkd.synthetic.ensure_segmentation_data(@dataset_dir, spatial_dims=3, size=32, "
        "counts=(2, 1, 1))",
        "patch_size": [16, 16, 16],
        "samples_per_volume": 1,
    },
}


def run_stage(bundle: str, stage: str, root: Path, **overrides) -> ConfigWorkflow:
    """Initialise and run one stage of ``bundle`` with ``bundle_root=root``; return the workflow."""
    workflow = ConfigWorkflow(
        config_file=[str(p) for p in STAGES[bundle][stage]],
        meta_file=str(BUNDLES / bundle / "configs" / "metadata.json"),
        logging_file=str(BUNDLES / bundle / "configs" / "logging.conf"),
        workflow_type="infer" if stage in ("evaluate", "inference") else "train",
        bundle_root=str(root),
        **{**TINY[bundle], "max_epochs": 1, **overrides},
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return workflow
