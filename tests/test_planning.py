"""Self-configuring bundles: the data fingerprint, the plan's choices, lateral classes, the plan file and the bundles
reading it (tiny 2D/3D data written here)."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_utils import BUNDLES, run_stage
from monai.data import MetaTensor
from monai.networks.nets import UNet
from monai.transforms import Compose, RandFlipd, RandSpatialCropd, SpatialPadd
from PIL import Image

from medkd.__main__ import main
from medkd.bundles import stage_config
from medkd.data.loading import DataError
from medkd.errors import ConfigError, user_error
from medkd.planning import (
    PLAN_FILE,
    NormalizeIntensityd,
    augmentations,
    auto_plan,
    data_file,
    lateral_flips,
    lateral_rot90,
    load_or_make,
    make_plan,
    make_settings,
    planfile,
    read_plan,
    scale_channels,
)
from medkd.planning.fingerprint import fingerprint_dataset
from medkd.planning.lateral import lateral_by_name, lateral_by_position
from medkd.planning.plan import SegmentationPlanner, SegmentationPlanner3D
from medkd.validation import check_patch_size, total_stride

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

LUNGS = ("background", "left lung", "right lung")
BOX = (8, 12)  # each class is one box of 8 x 12 voxels


def lateral_data(root, names=LUNGS, n=6, spacing=(1.5, 1.5), sides="fixed", single=False):
    """2D NIfTI images (40, 42 or 44) x 32: class 1 a box on the low side of axis 0 (value 100), class 2 one on the
    high side (value 200), background 0. ``sides="alternate"`` swaps the sides in every other image; ``single``
    writes one class, a box across the centre."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    entries = []
    for i in range(n):
        width = 40 + 2 * (i % 3)
        label = np.zeros((width, 32), np.uint8)
        if single:
            label[width // 2 - 10 : width // 2 + 10, 10:22] = 1
        else:
            low, high = (1, 2) if sides == "fixed" or i % 2 == 0 else (2, 1)
            label[6 : 6 + BOX[0], 10 : 10 + BOX[1]] = low
            label[width - 6 - BOX[0] : width - 6, 10 : 10 + BOX[1]] = high
        image = np.where(label == 1, 100.0, np.where(label == 2, 200.0, 0.0)).astype(np.float32)
        affine = np.diag([*spacing, 1.0, 1.0])
        nib.save(nib.Nifti1Image(image, affine), root / "images" / f"c{i}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labels" / f"c{i}.nii.gz")
        entries.append({"image": f"images/c{i}.nii.gz", "label": f"labels/c{i}.nii.gz"})
    labels = {str(i): name for i, name in enumerate(names[: 2 if single else 3])}
    datalist = {"labels": labels, "training": entries[:4], "validation": entries[4:], "test": entries[4:]}
    (root / "dataset.json").write_text(json.dumps(datalist))
    return root


def ct_volumes(root, n=5, shape=(24, 20, 6), spacing=(0.8, 0.8, 4.0)):
    """3D int16 CT-like volumes (air -1000 around two boxes of 40 HU), classes kidney_l / kidney_r."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    entries = []
    for i in range(n):
        label = np.zeros(shape, np.uint8)
        label[3:9, 6:14, 1:5] = 1
        label[15:21, 6:14, 1:5] = 2
        image = np.where(label > 0, 40, -1000).astype(np.int16) + rng.integers(-5, 5, shape).astype(np.int16)
        affine = np.diag([*spacing, 1.0])
        nib.save(nib.Nifti1Image(image, affine), root / "images" / f"v{i}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labels" / f"v{i}.nii.gz")
        entries.append({"image": f"images/v{i}.nii.gz", "label": f"labels/v{i}.nii.gz"})
    labels = {"0": "background", "1": "kidney_l", "2": "kidney_r"}
    datalist = {"labels": labels, "training": entries[:3], "validation": entries[3:4], "test": entries[4:]}
    (root / "dataset.json").write_text(json.dumps(datalist))
    return root


def fake_fingerprint(
    size, spacing, cases=200, lateral=(), ct=False, channels=1, training=None, classes=None, percentile_10=None
):
    """A fingerprint as :func:`fingerprint_dataset` writes it, for plan-only tests (``classes``: ``(name, samples)``
    pairs, left out when None; ``percentile_10``: the spacing's, default the median)."""
    intensity = {"over": "foreground", "mean": 50.0, "std": 20.0, "percentile_00_5": -50.0, "percentile_99_5": 200.0,
                 "image_min": -1024.0 if ct else 0.0, "integer": ct, "ct_like": ct}  # fmt: skip
    fingerprint = {
        "spatial_dims": len(size),
        "in_channels": channels,
        "channels_seen": {str(channels): cases},
        "cases": cases,
        "lists": {"training": training or cases},
        "spacing": {"median": list(spacing), "percentile_10": list(percentile_10 or spacing)},
        "size": {"median": list(size)},
        "intensity": [{"channel": c, **intensity} for c in range(channels)],
    }
    if classes is not None:
        fingerprint["classes"] = [{"name": n, "samples": s} for n, s in classes]
    return {**fingerprint, "lateral": list(lateral)}


# ---------------------------------------------------------------------------------------------------- fingerprint


def test_fingerprint_measures_spacing_sizes_intensities_and_classes(tmp_path):
    root = lateral_data(tmp_path / "data")
    datalist = json.loads((root / "dataset.json").read_text())
    lists = {k: [{key: str(root / v) for key, v in e.items()} for e in datalist[k]] for k in ("training", "validation")}
    fp = fingerprint_dataset(lists, class_names=LUNGS, axcodes="RA")
    assert fp["spatial_dims"] == 2 and fp["in_channels"] == 1 and fp["cases"] == 6
    assert fp["spacing"]["median"] == [1.5, 1.5]
    assert fp["size"] == {"median": [42, 32], "min": [40, 32], "max": [44, 32], "percentile_10": [40, 32]}
    (intensity,) = fp["intensity"]
    assert intensity["over"] == "foreground"  # the labelled voxels only: half at 100, half at 200
    assert intensity["mean"] == pytest.approx(150) and intensity["std"] == pytest.approx(50)
    assert intensity["percentile_00_5"] == pytest.approx(100) and intensity["percentile_99_5"] == pytest.approx(200)
    assert intensity["integer"] and intensity["image_min"] == 0 and not intensity["ct_like"]
    total = 32 * (40 + 42 + 44) * 2
    box = math.prod(BOX) * 6
    classes = {c["name"]: c for c in fp["classes"]}
    assert classes["left lung"]["voxel_fraction"] == pytest.approx(box / total, rel=1e-3)
    assert classes["background"]["voxel_fraction"] == pytest.approx(1 - 2 * box / total, rel=1e-3)
    assert classes["right lung"]["images"] == 6 and classes["right lung"]["objects_per_image"] == 1
    assert classes["left lung"]["median_extent"] == [BOX[0] * 1.5, BOX[1] * 1.5]  # in spacing units
    (pair,) = fp["lateral"]
    assert pair["classes"] == [1, 2] and pair["axis"] == 0 and pair["found_by"] == ["name", "position"]


def test_ct_like_volumes_get_clipped_and_scaled_and_anisotropic_3d_spacing_is_planned(tmp_path):
    root = ct_volumes(tmp_path / "ct")
    plan = make_plan(str(root / "dataset.json"), spatial_dims=3, device="cpu")
    (intensity,) = plan["fingerprint"]["intensity"]
    assert intensity["ct_like"] and intensity["integer"] and intensity["image_min"] <= -1000
    norm = plan["settings"]["normalization"]
    assert norm["scheme"] == "ct" and 30 <= norm["clip"][0] < norm["clip"][1] <= 50  # foreground percentiles
    assert plan["settings"]["pixdim"] == [0.8, 0.8, 4.0]
    assert plan["settings"]["strides"][0] == [2, 2, 1]  # the coarse axis is not downsampled at first
    assert plan["settings"]["flip_axes"] == [1, 2]  # kidney_l / kidney_r lie apart along axis 0
    assert plan["settings"]["rotate_degrees"] == [0.0, 0.0, 15.0]  # in-plane rotations only
    # an MR-like (float, positive) image is z-scored instead
    mr = make_settings(fake_fingerprint([64, 64, 32], [1, 1, 1], ct=False))[0]["normalization"]
    assert mr == {"scheme": "zscore"}


def test_normalization_per_channel(tmp_path):
    rng = np.random.default_rng(0)
    ct = np.where(rng.random((16, 16)) > 0.5, -1000, 60).astype(np.int16)
    mr = (rng.random((16, 16)) * 300 + 50).astype(np.float32)
    label = np.zeros((16, 16), np.uint8)
    label[4:12, 4:12] = 1
    for name, array in (("ct", ct), ("mr", mr), ("lab", label)):
        nib.save(nib.Nifti1Image(array, np.eye(4)), tmp_path / f"{name}.nii.gz")
    entry = {"image": [str(tmp_path / "ct.nii.gz"), str(tmp_path / "mr.nii.gz")], "label": str(tmp_path / "lab.nii.gz")}
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "bg", "1": "x"}, "training": [entry] * 2}))
    plan = make_plan(str(tmp_path / "dataset.json"), spatial_dims=2)
    assert plan["settings"]["in_channels"] == 2
    schemes = plan["settings"]["normalization"]
    assert [s["scheme"] for s in schemes] == ["ct", "zscore"]
    image = MetaTensor(torch.as_tensor(np.stack([ct, mr]).astype(np.float32)))
    out = NormalizeIntensityd("image", schemes)({"image": image})["image"]
    assert out.shape == image.shape
    assert float(out[1].mean()) == pytest.approx(0, abs=1e-5) and float(out[1].std(unbiased=False)) == pytest.approx(1)
    lo, hi = schemes[0]["clip"]
    expected = (np.clip(ct, lo, hi) - schemes[0]["mean"]) / schemes[0]["std"]
    np.testing.assert_allclose(out[0].numpy(), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="not one of the schemes"):
        NormalizeIntensityd("image", {"scheme": "zscor"})


# ------------------------------------------------------------------------------------------------- plan choices


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize(
    "size, spacing",
    [([512, 512], [0.7, 0.7]), ([256, 256], [1.4, 1.4]), ([300, 180], [1.0, 1.0]), ([512, 512, 100], [0.7, 0.7, 2.5]),
     ([96, 128, 128], [1.0, 1.0, 1.0])],
)  # fmt: skip
def test_patch_and_batch_fit_the_budget_and_strides_divide_the_patch(size, spacing, device):
    settings, reasons = make_settings(fake_fingerprint(size, spacing), device=device)
    budget = SegmentationPlanner.budgets[device]["voxels"]
    patch, dims = settings["patch_size"], len(size)
    patches = settings["batch_size"] * settings.get("samples_per_volume", 1)
    assert patches >= 2 and math.prod(patch) * patches <= budget, (patch, patches)
    assert all(p <= s for p, s in zip(patch, size, strict=True))  # no larger than the median image
    net = UNet(dims, 1, 3, channels=settings["teacher_channels"], strides=settings["strides"], num_res_units=0)
    stride = total_stride(net)
    assert all(p % s == 0 for p, s in zip(patch, stride, strict=True)), (patch, stride)
    check_patch_size({"teacher": net}, patch)
    assert len(settings["teacher_channels"]) == len(settings["strides"]) + 1
    assert min(p // s for p, s in zip(patch, stride, strict=True)) >= 4  # stops at feature maps of ~4 voxels
    assert {"pixdim", "patch_size", "batch_size", "strides", "max_epochs"} <= set(reasons)
    if math.prod(size) * 2 <= budget:
        assert patch == [s // t * t for s, t in zip(size, stride, strict=True)]  # covers the median image
    if dims == 2 and device == "cpu":  # the planned U-Net runs on the planned patch
        small = make_settings(fake_fingerprint(size, spacing), device=device, voxel_budget=2**13)[0]
        net = UNet(2, 1, 3, channels=scale_channels(small["teacher_channels"], 0.25), strides=small["strides"])
        assert net(torch.zeros(1, 1, *small["patch_size"])).shape[2:] == torch.Size(small["patch_size"])


def test_gpu_plans_larger_batches_and_more_iterations_than_cpu():
    cpu = make_settings(fake_fingerprint([256, 256], [1, 1], cases=4000), device="cpu")[0]
    gpu = make_settings(fake_fingerprint([256, 256], [1, 1], cases=4000), device="cuda")[0]
    assert cpu["patch_size"] == gpu["patch_size"] == [256, 256]
    assert gpu["batch_size"] > cpu["batch_size"] >= 2
    assert gpu["teacher_channels"][0] > cpu["teacher_channels"][0]
    assert cpu["iterations_per_epoch"] == 250  # 500 batches of 8: an epoch is capped at nnU-Net's 250 iterations
    assert gpu["iterations_per_epoch"] is None  # 63 batches of 64: an epoch is one pass

    def iterations(s):
        return s["max_epochs"] * (s["iterations_per_epoch"] or math.ceil(4000 / s["batch_size"]))

    assert iterations(gpu) > iterations(cpu) >= SegmentationPlanner.budgets["cpu"]["iterations"]


def test_target_spacing_follows_nnunet_for_thick_slices():
    iso = SegmentationPlanner3D(fake_fingerprint([128, 128, 128], [1.0, 1.0, 1.2]))
    assert iso.determine_spacing() == [1.0, 1.0, 1.2]  # median
    thick = fake_fingerprint([512, 512, 30], [0.7, 0.7, 5.0])
    thick["spacing"]["percentile_10"] = [0.6, 0.6, 3.0]
    planner = SegmentationPlanner3D(thick)
    assert planner.determine_spacing() == [0.7, 0.7, 3.0] and "10th percentile" in planner.reasons["pixdim"]


# ---------------------------------------------------------------------------------------------- lateral classes


def test_lateral_classes_by_name():
    names = ["background", "Left Lung", "right lung", "clavicle_l", "clavicle_r", "heart", "L1", "kidneyLt",
             "KidneyRt", "ren sinister", "liver", "Right-Lateral-Ventricle", "Left-Lateral-Ventricle"]  # fmt: skip
    pairs, singles = lateral_by_name(names)
    assert sorted(pairs) == [(1, 2), (3, 4), (7, 8), (12, 11)]
    assert singles == [9]  # 'ren sinister' has no partner; 'L1' (a vertebra), 'heart', 'liver' are not lateral
    findings = ["lesion_left", "lesion_right", "normal"]  # a classifier's class 0 is a finding, not the background
    assert lateral_by_name(findings, background=False) == ([(0, 1)], []) and lateral_by_name(findings) == ([], [1])


def test_lateral_classes_by_position_and_no_false_positives(tmp_path):
    # neutral names: found by position alone, with the axis that separates them
    plan = make_plan(str(lateral_data(tmp_path / "ab", names=("background", "a", "b")) / "dataset.json"))
    (pair,) = plan["fingerprint"]["lateral"]
    assert pair["found_by"] == ["position"] and pair["axis"] == 0 and pair["classes"] == [1, 2]
    assert plan["settings"]["flip_axes"] == [1]
    # one symmetric class (both lungs as one label) is not lateral: every flip stays
    plan = make_plan(str(lateral_data(tmp_path / "one", names=("background", "lungs"), single=True) / "dataset.json"))
    assert plan["fingerprint"]["lateral"] == [] and plan["settings"]["flip_axes"] == [0, 1]
    # two classes that swap sides from image to image are not a lateral pair
    swapping = lateral_data(tmp_path / "swap", names=("background", "a", "b"), sides="alternate")
    plan = make_plan(str(swapping / "dataset.json"))
    assert plan["fingerprint"]["lateral"] == [] and plan["settings"]["flip_axes"] == [0, 1]
    # unit level: consistent on axis 1 only
    centroids = [{1: [0.01, -0.3], 2: [0.02, 0.3]}, {1: [-0.02, -0.25], 2: [0.0, 0.28]}, {1: [0, -0.3], 2: [0, 0.3]}]
    assert lateral_by_position(centroids) == [{"classes": [1, 2], "axis": 1, "agreement": 1.0, "images": 3}]
    assert lateral_by_position(centroids[:1]) == []  # one image decides nothing


def _sides(label: torch.Tensor) -> tuple[float, float]:
    """Mean axis-0 position of class 1 and of class 2."""
    xs = torch.arange(label.shape[1], dtype=torch.float32)[:, None].expand(label.shape[1:])
    return tuple(float(xs[label[0] == c].mean()) for c in (1, 2))


def test_left_and_right_labels_survive_the_planned_augmentation(tmp_path):
    settings = make_plan(str(lateral_data(tmp_path / "data") / "dataset.json"))["settings"]
    assert settings["flip_axes"] == [1] and settings["rotate_degrees"] and settings["intensity_augmentation"]
    label = np.zeros((42, 32), np.float32)
    label[6:14, 10:22], label[28:36, 10:22] = 1, 2
    tensor = torch.as_tensor(label)[None]
    sample = {"image": MetaTensor(tensor * 100), "label": MetaTensor(tensor)}
    keys, patch = ["image", "label"], settings["patch_size"]

    def pipeline(flip_axes):
        crop = [SpatialPadd(keys, patch), RandSpatialCropd(keys, patch)]
        planned = dict(rot90_axes=settings["rot90_axes"], rotate_degrees=settings["rotate_degrees"],
                       scale_range=settings["scale_range"], intensity=True, mode=["bilinear", "nearest"])  # fmt: skip
        return Compose(crop + augmentations(keys, 2, flip_axes=flip_axes, **planned))

    planned, changed = pipeline(settings["flip_axes"]), 0
    for seed in range(200):
        planned.set_random_state(seed)
        out = planned(dict(sample))
        left, right = _sides(out["label"])
        centre = (out["label"].shape[1] - 1) / 2
        assert left < centre < right, (seed, left, right)
        changed += not torch.equal(out["label"], torch.as_tensor(label)[None, : patch[0], : patch[1]])
    assert changed > 50  # the augmentation did change the samples
    naive = pipeline([0, 1])  # nnU-Net's default mirroring would swap them
    swapped = 0
    for seed in range(50):
        naive.set_random_state(seed)
        left, right = _sides(naive(dict(sample))["label"])
        swapped += left > right
    assert swapped > 0


# ------------------------------------------------------------------------------------ plan file and the bundles


def test_bundle_reads_the_plan_and_overrides_win(tmp_path):
    root = lateral_data(tmp_path / "data")
    parser = stage_config(BUNDLES / "segmentation_2d", "train", {"dataset_dir": str(root), "patch_size": [16, 16]})
    assert parser.get_parsed_content("patch_size") == [16, 16]  # the override wins: nothing planned yet
    assert not (root / "medkd_plan.json").exists()
    parser.get_parsed_content("pixdim")
    plan = read_plan(root / "medkd_plan.json")  # made on first use, next to the data
    settings = plan["settings"]
    for key in ("pixdim", "batch_size", "max_epochs", "flip_axes", "strides", "teacher_channels"):
        assert parser.get_parsed_content(key) == settings[key], key
    assert parser.get_parsed_content("student_channels") == scale_channels(
        settings["teacher_channels"], parser.get_parsed_content("compression")
    )
    assert list(parser.get_parsed_content("teacher_def").channels) == settings["teacher_channels"]
    flips = [t for t in parser.get_parsed_content("augment") if isinstance(t, RandFlipd)]
    assert [t.flipper.spatial_axis for t in flips] == [1]  # none across the lungs' axis
    # more overrides: an augmentation key, and the bundle's defaults instead of the plan
    parser = stage_config(BUNDLES / "segmentation_2d", "train", {"dataset_dir": str(root), "flip_axes": [0, 1]})
    flips = [t for t in parser.get_parsed_content("augment") if isinstance(t, RandFlipd)]
    assert [t.flipper.spatial_axis for t in flips] == [0, 1]
    parser = stage_config(BUNDLES / "segmentation_2d", "train", {"dataset_dir": str(root), "auto_plan": False})
    assert parser.get_parsed_content("patch_size") == parser.get_parsed_content("default_plan")["patch_size"]
    # an edited plan file is used as it is, by every stage
    settings["patch_size"] = [24, 24]
    (root / "medkd_plan.json").write_text(json.dumps({**plan, "settings": settings}))
    parser = stage_config(BUNDLES / "segmentation_2d", "evaluate", {"dataset_dir": str(root)})
    assert parser.get_parsed_content("inferer").roi_size == [24, 24]


def test_plan_file_mistakes_are_named(tmp_path):
    root = lateral_data(tmp_path / "data")
    load_or_make(root / "medkd_plan.json", str(root / "dataset.json"), task="segmentation", spatial_dims=2)
    with pytest.raises(ConfigError, match="is a segmentation plan, but this is a classification bundle"):
        load_or_make(root / "medkd_plan.json", str(root / "dataset.json"), task="classification")
    with pytest.raises(ConfigError, match=r"for 2D images, but this bundle has spatial_dims=3"):
        load_or_make(root / "medkd_plan.json", str(root / "dataset.json"), task="segmentation", spatial_dims=3)
    (root / "medkd_plan.json").write_text('{"settings": {')
    with pytest.raises(ConfigError, match=r"medkd_plan.json is not valid JSON .*delete it"):
        read_plan(root / "medkd_plan.json")
    (root / "medkd_plan.json").unlink()
    with pytest.raises(
        ConfigError,
        match="are 2D but this bundle has spatial_dims=3: run .*bundles/segmentation_2d/configs/train.json",
    ):
        make_plan(str(root / "dataset.json"), spatial_dims=3)
    lists = dict.fromkeys(("training", "validation"), str(root / "dataset.json"))  # a bundle's datalists: one named
    with pytest.raises(ConfigError, match=f"images of {root / 'dataset.json'} are 2D but this bundle has spatial_"):
        make_plan(lists, spatial_dims=3)
    volumes = tmp_path / "volumes.json"
    for i in range(2):
        nib.save(nib.Nifti1Image(np.random.rand(8, 8, 8).astype(np.float32), np.eye(4)), tmp_path / f"v{i}.nii.gz")
    volumes.write_text(json.dumps({"training": [{"image": f"v{i}.nii.gz", "label": i} for i in range(2)]}))
    with pytest.raises(
        ConfigError,
        match="are 3D but this bundle has spatial_dims=2: run .*bundles/classification_3d/configs/train.json",
    ):
        make_plan(volumes, task="classification", spatial_dims=2)
    seg = tmp_path / "seg.json"  # the 2D segmentation bundle reorients to RA: the volumes are named, not a traceback
    seg.write_text(json.dumps({"training": [{"image": f"v{i}.nii.gz", "label": f"v{i}.nii.gz"} for i in range(2)]}))
    with pytest.raises(
        ConfigError,
        match="are 3D but this bundle has spatial_dims=2: run .*bundles/segmentation_3d/configs/train.json",
    ):
        make_plan(seg, task="segmentation", spatial_dims=2, axcodes="RA")


def test_plan_command_writes_the_plan_and_prints_a_summary(tmp_path, capsys):
    root = lateral_data(tmp_path / "data")
    assert main(["plan", "--dataset-dir", str(root), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "lateral       left lung / right lung: axis 0, by name and position" in out
    assert "flip_axes" in out and f"Plan written to {root / 'medkd_plan.json'}" in out
    plan = read_plan(root / "medkd_plan.json")
    assert plan["task"] == "segmentation" and plan["device"] == "cpu" and plan["settings"]["flip_axes"] == [1]
    assert main(["plan", "--dataset-dir", str(root), "--device", "cuda"]) == 0  # again: the old plan is kept aside
    assert "moved aside" in capsys.readouterr().out and len(list(root.glob("medkd_plan.*.json"))) == 1
    assert read_plan(root / "medkd_plan.json")["device"] == "cuda"


def test_classification_plan_patch_size_and_lateral_findings(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    entries = []
    for i in range(12):
        name = f"img/{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray((rng.random((60, 70)) * 255).astype(np.uint8)).save(tmp_path / name)
        entries.append({"image": name, "label": i % 3})
    labels = {"0": "normal", "1": "effusion_left", "2": "effusion_right"}
    datalist = {"labels": labels, "training": entries[:9], "validation": entries[9:], "test": entries[9:]}
    (tmp_path / "dataset.json").write_text(json.dumps(datalist))
    parser = stage_config(BUNDLES / "classification_2d", "train", {"dataset_dir": str(tmp_path)})
    assert parser.get_parsed_content("patch_size") == [64, 64]  # 70 x 60 to a multiple of 32
    assert parser.get_parsed_content("lateral") is True  # 'effusion_left' / 'effusion_right'
    assert parser.get_parsed_content("flip_axes") == [1] and parser.get_parsed_content("rot90_axes") is None
    plan = read_plan(tmp_path / "medkd_plan.json")
    assert plan["task"] == "classification" and plan["fingerprint"]["classes"][1]["samples"] == 4
    parser = stage_config(BUNDLES / "classification_2d", "train", {"dataset_dir": str(tmp_path), "lateral": False})
    assert parser.get_parsed_content("flip_axes") == [0, 1]
    assert parser.get_parsed_content("normalization") == {"scheme": "zscore"}
    # a plan file of medkd 0.2 names the size image_size: still read, under the current name
    plan["settings"] = {"image_size": [96, 96], **{k: v for k, v in plan["settings"].items() if k != "patch_size"}}
    (tmp_path / "medkd_plan.json").write_text(json.dumps(plan))
    parser = stage_config(BUNDLES / "classification_2d", "train", {"dataset_dir": str(tmp_path)})
    assert parser.get_parsed_content("patch_size") == [96, 96]


def test_a_bundle_stage_runs_on_a_plan(tmp_path):
    root = ct_volumes(tmp_path / "ct", shape=(24, 20, 6))
    # the tests' tiny overlay sets these: back to the plan's
    plan_keys = {k: f"$@plan['{k}']" for k in ("patch_size", "batch_size", "samples_per_volume")}
    plan_keys["iterations_per_epoch"] = 2  # planned: 50 (3 training volumes, cycled)
    workflow = run_stage("segmentation_3d", "train_teacher", tmp_path / "run", dataset_dir=str(root), **plan_keys)
    settings = read_plan(root / "medkd_plan.json")["settings"]
    assert settings["iterations_per_epoch"] == 50 and settings["samples_per_volume"] == 2
    parser = workflow.parser
    assert parser.get_parsed_content("patch_size") == settings["patch_size"]
    trainer = parser.get_parsed_content("train#trainer")
    assert trainer.data_loader.batch_size == settings["batch_size"]
    assert trainer.state.epoch == 1 and trainer.state.iteration == 2
    assert list(parser.get_parsed_content("teacher").channels) == settings["teacher_channels"]
    assert (tmp_path / "run" / "models" / "teacher.pt").is_file()
    # the settings it used are kept beside the checkpoints, overrides marked
    used = json.loads((tmp_path / "run" / "models" / "settings_teacher.json").read_text())
    assert used["planned"] and used["settings"]["patch_size"] == settings["patch_size"]
    assert used["differs_from_plan"]["iterations_per_epoch"] == {"planned": 50, "why": "override"}
    assert "patch_size" not in used["differs_from_plan"]
    assert used["parameters"]["teacher"] == sum(p.numel() for p in parser.get_parsed_content("teacher").parameters())
    # the same plan makes a bundle for 2D images stop with the fix
    with pytest.raises((RuntimeError, SystemExit)) as err:
        run_stage("segmentation_2d", "train_teacher", tmp_path / "run2d", dataset_dir=str(root), **plan_keys)
    found = user_error(err.value)
    assert found is not None and "spatial_dims=2" in str(found), err.value


def test_lateral_findings_drop_left_right_flips_and_90_degree_rotations():
    assert lateral_flips([0, 1], lateral=True) == [1] and lateral_flips([0, 1], lateral=False) == [0, 1]
    assert lateral_rot90([0, 1], lateral=True) is None and lateral_rot90((0, 1), lateral=False) == [0, 1]
    assert lateral_rot90(None, lateral=False) is None


def test_auto_plan_for_any_data_but_the_embedded_default(tmp_path):
    assert not auto_plan(tmp_path / "bundle" / "data", tmp_path / "bundle")
    assert not auto_plan(f"{tmp_path}/bundle/./data/", f"{tmp_path}/bundle")
    assert auto_plan(tmp_path / "mine", tmp_path / "bundle")


def test_show_plan_marks_what_follows_lateral_and_what_was_overridden(caplog):
    from medkd.planning import show_plan

    plan = {"lateral": False, "flip_axes": [0, 1], "rot90_axes": [0, 1], "batch_size": 8}
    used = {"lateral": True, "flip_axes": [1], "rot90_axes": None, "batch_size": 4}
    with caplog.at_level("INFO", logger="medkd.planning"):
        show_plan(plan, used)
    lines = {line.split()[0]: line for line in caplog.text.splitlines()[1:]}
    assert lines["flip_axes"].endswith("(follows lateral; planned [0, 1])")
    assert lines["rot90_axes"].endswith("(follows lateral; planned [0, 1])")
    assert lines["batch_size"].endswith("(override; planned 8)")
    assert lines["lateral"].endswith("(override; planned false)")


def test_plan_counts_classes_by_their_values_in_the_labels_map(tmp_path, capsys):
    root = lateral_data(tmp_path / "data")
    for path in (root / "labels").iterdir():  # left lung 1 -> 127, right lung 2 -> 255
        label = nib.load(path)
        values = np.take([0, 127, 255], np.asarray(label.dataobj)).astype(np.uint8)
        nib.save(nib.Nifti1Image(values, label.affine), path)
    datalist = json.loads((root / "dataset.json").read_text())
    datalist["labels"] = {"0": "background", "127": "left lung", "255": "right lung"}
    (root / "dataset.json").write_text(json.dumps(datalist))
    plan = make_plan(root / "dataset.json", spatial_dims=2)
    classes = {c["name"]: c for c in plan["fingerprint"]["classes"]}
    assert [c["value"] for c in classes.values()] == [0, 127, 255] and len(classes) == 3
    assert classes["right lung"]["images"] == 6
    assert classes["right lung"]["median_extent"] == [BOX[0] * 1.5, BOX[1] * 1.5]
    assert plan["fingerprint"]["lateral"][0]["classes"] == [1, 2] and not plan["fingerprint"]["warnings"]
    assert main(["plan", "--dataset-dir", str(root)]) == 0
    assert "class 2 right lung (value 255): " in capsys.readouterr().out
    first = root / datalist["training"][0]["label"]
    nib.save(nib.Nifti1Image(np.full((40, 32), 7, np.uint8), nib.load(first).affine), first)
    (warning,) = make_plan(root / "dataset.json", spatial_dims=2)["fingerprint"]["warnings"]
    assert warning == f"{first}: label values [7] are no class's value ('labels' map); counted as background"


def test_plan_command_plans_from_the_lists_the_bundles_hold_out(tmp_path, capsys):
    from medkd.training.run_fingerprint import datalist_digest

    root = lateral_data(tmp_path / "data")
    datalist = json.loads((root / "dataset.json").read_text())
    cases = datalist.pop("training") + datalist.pop("validation")
    datalist.update(training=cases, test=[c["image"] for c in datalist["test"]])  # the Decathlon layout
    (root / "dataset.json").write_text(json.dumps(datalist))
    assert main(["plan", "--dataset-dir", str(root)]) == 0
    split = root / "medkd_splits.json"
    assert f"lacks validation and test: the lists are in {split}" in capsys.readouterr().out
    plan = read_plan(root / "medkd_plan.json")
    assert plan["data"] == datalist_digest(dict.fromkeys(("training", "validation"), split))
    assert plan["fingerprint"]["cases"] == len(json.loads(split.read_text())["training"]) + 1  # and 1 validation


def _read_only(root, monkeypatch):
    """Make ``root`` read-only; where chmod does not stop this user (root), the check medkd makes says so."""
    root.chmod(0o555)
    if os.access(root, os.W_OK):
        monkeypatch.setattr(planfile, "writable", lambda folder: Path(folder).resolve() != root.resolve())


def test_a_read_only_data_folder_gets_its_plan_and_split_beside_the_run_outputs(tmp_path, monkeypatch, caplog):
    root = lateral_data(tmp_path / "data")
    datalist = json.loads((root / "dataset.json").read_text())
    datalist = {"labels": datalist["labels"], "training": datalist["training"] + datalist["validation"]}
    (root / "dataset.json").write_text(json.dumps(datalist))  # no validation list: the bundle makes a split file
    run = tmp_path / "run"
    _read_only(root, monkeypatch)
    try:
        parser = stage_config(BUNDLES / "segmentation_2d", "train", {"dataset_dir": str(root), "bundle_root": str(run)})
        with caplog.at_level(logging.INFO, logger="medkd.planning"):
            parser.get_parsed_content("pixdim")
        assert sorted(p.name for p in root.iterdir()) == ["dataset.json", "images", "labels"]  # nothing written
        assert f"{root} is read-only: medkd_plan.json is read from and written to {run / PLAN_FILE}" in caplog.text
        plan = read_plan(run / PLAN_FILE)
        assert Path(plan["data"]["training"]["file"]).resolve() == (run / "medkd_splits.json").resolve()
        plan["settings"]["patch_size"] = [24, 24]  # the next run reads them from there
        (run / PLAN_FILE).write_text(json.dumps(plan))
        parser = stage_config(
            BUNDLES / "segmentation_2d", "evaluate", {"dataset_dir": str(root), "bundle_root": str(run)}
        )
        assert parser.get_parsed_content("inferer").roi_size == [24, 24]
        assert data_file(root, "dataset.json", run) == str(root / "dataset.json")  # a file there is read from there
        cwd = tmp_path / "cwd"
        cwd.mkdir()
        monkeypatch.chdir(cwd)
        assert main(["plan", "--dataset-dir", str(root)]) == 0  # the command writes into the current folder
        assert (cwd / PLAN_FILE).is_file() and (cwd / "medkd_splits.json").is_file()
    finally:
        root.chmod(0o755)


@pytest.mark.parametrize("field", ["modality", "channel_names"])  # Decathlon's name, nnU-Net v2's
def test_the_datalist_can_say_the_images_are_ct(tmp_path, field):
    root = lateral_data(tmp_path / "data")
    assert not make_plan(root / "dataset.json")["fingerprint"]["intensity"][0]["ct_like"]  # 0..200: not by values
    datalist = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**datalist, field: {"0": "CT"}}))
    plan = make_plan(root / "dataset.json")
    assert plan["fingerprint"]["intensity"][0]["ct_like"] and plan["settings"]["normalization"]["scheme"] == "ct"


def test_a_case_without_foreground_adds_nothing_to_the_foreground_intensities(tmp_path):
    root = ct_volumes(tmp_path / "ct")
    cases = [{"image": str(root / f"images/v{i}.nii.gz"), "label": str(root / f"labels/v{i}.nii.gz")} for i in range(5)]
    empty = nib.load(cases[0]["label"])
    nib.save(nib.Nifti1Image(np.zeros(empty.shape, np.uint8), empty.affine), tmp_path / "negative.nii.gz")
    negative = {**cases[0], "label": str(tmp_path / "negative.nii.gz")}  # a negative case: nothing to segment
    (without,) = fingerprint_dataset({"training": cases[1:]}, class_names=["bg", "a", "b"])["intensity"]
    (with_it,) = fingerprint_dataset({"training": [negative, *cases[1:]]}, class_names=["bg", "a", "b"])["intensity"]
    for key in ("mean", "std", "percentile_00_5", "percentile_99_5"):
        assert with_it[key] == without[key], key  # not the whole negative volume's air at -1000
    assert with_it["over"] == "foreground" and with_it["image_min"] <= -1000
    (only,) = fingerprint_dataset({"training": [negative]}, class_names=["bg", "a", "b"])["intensity"]
    assert only["mean"] < -800 and only["over"] == "whole image"  # no foreground anywhere: the whole image


def test_images_of_two_dimensionalities_are_named(tmp_path):
    for name, shape in (("flat", (8, 8)), ("volume", (8, 8, 8))):
        nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), tmp_path / f"{name}.nii.gz")
    lists = {"training": [{"image": str(tmp_path / "flat.nii.gz"), "label": 0}]}
    lists["validation"] = [{"image": str(tmp_path / "volume.nii.gz"), "label": 1}]
    with pytest.raises(DataError) as error:
        fingerprint_dataset(lists, task="classification")
    assert f"(1 2D, e.g. {tmp_path / 'flat.nii.gz'}, 1 3D, e.g. {tmp_path / 'volume.nii.gz'})" in str(error.value)
