"""The segmentation bundles: metadata, network shapes and every stage on tiny generated data."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from bundle_utils import BUNDLES, SCHEMA, STAGES, mlflow_metrics, run_stage
from monai.bundle import verify_metadata, verify_net_in_out

from medkd.engines import iteration_losses

SEGMENTATION = ["segmentation_2d", "segmentation_3d"]


@pytest.mark.parametrize("bundle", SEGMENTATION)
def test_metadata_is_valid(bundle):
    verify_metadata(meta_file=str(BUNDLES / bundle / "configs" / "metadata.json"), filepath=str(SCHEMA))
    meta = json.loads((BUNDLES / bundle / "configs" / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    for f in ("LICENSE", "docs/README.md", "configs/logging.conf"):
        assert (BUNDLES / bundle / f).is_file(), f


@pytest.mark.parametrize("bundle", SEGMENTATION)
@pytest.mark.parametrize("net_id", ["teacher_def", "student_def"])
def test_networks_match_metadata(bundle, net_id):
    verify_net_in_out(
        net_id=net_id,
        meta_file=str(BUNDLES / bundle / "configs" / "metadata.json"),
        config_file=[str(p) for p in STAGES[bundle]["train"]],
        device="cpu",
        n=1,
        num_classes=3,
    )


@pytest.mark.parametrize("bundle", SEGMENTATION)
def test_all_stages_run_end_to_end(bundle, tmp_path):
    run_stage(bundle, "train_teacher", tmp_path)
    assert (tmp_path / "models" / "teacher.pt").is_file()
    trainer = run_stage(bundle, "train", tmp_path).parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 1 and trainer.state.iteration == len(trainer.data_loader) >= 1
    assert {"sp/prediction_from_teacher", "sf/feature_from_teacher", "sp/feature_from_sf"} <= set(
        iteration_losses(trainer.state.output)
    )
    for name in ("sp", "sf"):
        assert (tmp_path / "models" / f"{name}.pt").is_file()

    run_stage(bundle, "evaluate", tmp_path)
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert [r["network"] for r in rows] == ["teacher", "sp", "sf"]
    assert all(0.0 <= r["mean_dice"] <= 1.0 and r["params"] > 0 for r in rows)
    assert rows[0]["params"] > rows[1]["params"]
    datalist = json.loads((tmp_path / "data" / "dataset.json").read_text())
    per_case = list(csv.DictReader((tmp_path / "eval" / "val_mean_dice_sp_raw.csv").open()))
    assert len(per_case) == len(datalist["test"])
    assert list(per_case[0]) == ["filename", "dim_object", "bright_object", "mean"]  # the datalist's labels, by name
    for name in ("dim_object", "bright_object"):
        per_class = np.nanmean([float(case[name]) for case in per_case])
        assert rows[1][f"mean_dice:{name}"] == pytest.approx(per_class, abs=1e-6)
    summary = list(csv.reader((tmp_path / "eval" / "val_mean_dice_sp_summary.csv").open()))
    assert [r[0] for r in summary] == ["class", "dim_object", "bright_object", "mean"]

    run_stage(bundle, "inference", tmp_path)
    for case in datalist["test"]:
        image = nib.load(tmp_path / "data" / case["image"])
        name = case["image"].split("/")[-1].replace(".nii.gz", "_seg.nii.gz")
        seg = nib.load(tmp_path / "eval" / "segmentations" / name)
        assert seg.shape == image.shape
        np.testing.assert_allclose(seg.affine, image.affine, atol=1e-5)
        assert set(np.unique(seg.get_fdata())) <= {0.0, 1.0, 2.0}


def test_routes_preset_and_classes_from_command_line(tmp_path):
    workflow = run_stage("segmentation_2d", "train_teacher", tmp_path)
    assert workflow.parser.get_parsed_content("num_classes") == 3  # from the datalist's labels map
    trainer = run_stage("segmentation_2d", "train", tmp_path, routes_preset="kd").parser.get_parsed_content(
        "train#trainer"
    )
    assert set(iteration_losses(trainer.state.output)) == {
        "sp/sup", "sf/sup", "sp/total", "sf/total", "sp/prediction_from_teacher", "sf/prediction_from_teacher"
    }  # fmt: skip


def test_inference_skips_a_corrupt_file_and_says_so(tmp_path):
    run_stage("segmentation_2d", "train_teacher", tmp_path)
    run_stage("segmentation_2d", "train", tmp_path)
    new = tmp_path / "new"
    new.mkdir()
    (new / "a_good.nii.gz").write_bytes((tmp_path / "data" / "images" / "test_000.nii.gz").read_bytes())
    (new / "b_corrupt.nii.gz").write_bytes(b"\x1f\x8b this is not a NIfTI file")
    # any in-plane size, flipped axes and an offset: the segmentation comes back on the input's grid
    odd_affine = np.array([[-0.7, 0, 0, 12.0], [0, 1.1, 0, -3.0], [0, 0, 1, 0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(np.random.rand(53, 41).astype(np.float32), odd_affine), new / "c_odd.nii.gz")
    run_stage("segmentation_2d", "inference", tmp_path, input_dir=str(new), output_dir=str(tmp_path / "out"))
    assert (tmp_path / "out" / "a_good_seg.nii.gz").is_file()
    odd = nib.load(tmp_path / "out" / "c_odd_seg.nii.gz")
    assert odd.shape == (53, 41)
    np.testing.assert_allclose(odd.affine, odd_affine, atol=1e-5)
    assert not (tmp_path / "out" / "b_corrupt_seg.nii.gz").exists()
    skipped = (tmp_path / "out" / "skipped.tsv").read_text().splitlines()
    assert len(skipped) == 1 and skipped[0].startswith(str(new / "b_corrupt.nii.gz"))


def test_mlflow_tracking_logs_every_stage_to_a_local_store(tmp_path):
    run_stage("segmentation_2d", "train_teacher", tmp_path, tracking="mlflow")
    assert (tmp_path / "eval" / "mlruns.db").is_file()
    runs = mlflow_metrics(tmp_path)
    assert any({"val_mean_dice_teacher", "train_loss"} <= metrics for metrics in runs), runs
    run_stage("segmentation_2d", "train", tmp_path, tracking="mlflow")
    expected = {
        "train_loss",
        "val_mean_dice_sp",
        "val_mean_dice_sf",
        "loss/sp/prediction_from_teacher",
        "loss/sf/total",
    }
    runs = mlflow_metrics(tmp_path)
    assert any(expected <= metrics for metrics in runs), runs
    run_stage("segmentation_2d", "evaluate", tmp_path, tracking="mlflow", networks="@students")
    runs = mlflow_metrics(tmp_path)
    assert len(runs) == 3 and {"val_mean_dice_sp", "val_mean_dice_sf"} in runs, runs  # + a run of the test scores
