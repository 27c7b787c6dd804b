"""The 2D classification bundle: metadata, network shapes and every stage on tiny generated data."""

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_utils import BUNDLES, SCHEMA, STAGES, latest_run, mlflow_metrics, run_stage
from monai.bundle import verify_metadata, verify_net_in_out

from medkd.training.engines import iteration_losses

BUNDLE = "classification_2d"
CLASSIFICATION = [BUNDLE, "classification_3d"]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_probabilities(row, columns):
    values = [float(row[c]) for c in columns]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert sum(values) == pytest.approx(1.0, abs=1e-4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Teacher and diversified students (tracked with MLflow) trained for one epoch on tiny data; the teacher-stage
    workflow."""
    root = tmp_path_factory.mktemp("classification")
    teacher = run_stage(BUNDLE, "train_teacher", root)
    trainer = run_stage(BUNDLE, "train", root, tracking="mlflow").parser.get_parsed_content("train#trainer")
    return root, teacher, trainer


def test_mlflow_tracks_the_distillation_stage(trained):
    root, _, _ = trained
    logged = mlflow_metrics(root)
    assert any({"train_loss", "val_auc_sp", "val_auc_sf", "loss/sp/prediction_from_teacher"} <= m for m in logged), (
        logged
    )


@pytest.mark.parametrize("bundle", CLASSIFICATION)
def test_metadata_is_valid(bundle):
    configs = BUNDLES / bundle / "configs"
    verify_metadata(meta_file=str(configs / "metadata.json"), filepath=str(SCHEMA))
    meta = json.loads((configs / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    for f in ("LICENSE", "docs/README.md", "configs/logging.conf"):
        assert (BUNDLES / bundle / f).is_file(), f


@pytest.mark.parametrize("net_id", ["teacher_def", "student_def"])
@pytest.mark.parametrize("bundle", CLASSIFICATION)
def test_networks_match_metadata(bundle, net_id):
    verify_net_in_out(
        net_id=net_id,
        meta_file=str(BUNDLES / bundle / "configs" / "metadata.json"),
        config_file=[str(p) for p in STAGES[bundle]["train"]],
        device="cpu",
        n=1,
        num_classes=2,
    )


def test_training_stages(trained):
    root, teacher, trainer = trained
    assert (root / "models" / "teacher.pt").is_file()
    assert teacher.parser.get_parsed_content("class_names") == ["no_lesion", "lesion"]  # the datalist's labels map
    assert teacher.parser.get_parsed_content("num_classes") == 2
    assert trainer.state.epoch == 1 and trainer.state.iteration == len(trainer.data_loader) >= 1
    losses = iteration_losses(trainer.state.output)
    # the bundle's diversified routes; the peer feature routes, weighted 0 by default, are not computed
    assert {k for k in losses if "_from_" in k} == {
        "sp/prediction_from_teacher",
        "sf/feature_from_teacher",
        "sp/prediction_from_sf",
        "sf/prediction_from_sp",
    }
    assert all(math.isfinite(v) for v in losses.values())
    for name in ("sp", "sf"):
        assert (root / "models" / f"{name}.pt").is_file()


def test_evaluate_writes_auc_accuracy_probabilities_and_pictures(trained):
    root = trained[0]
    run_stage(BUNDLE, "evaluate", root)
    rows = json.loads((root / "eval" / "results.json").read_text())
    assert [r["network"] for r in rows] == ["teacher", "sp", "sf", "ensemble"]
    assert all(0.0 <= r["auc"] <= 1.0 and 0.0 <= r["acc"] <= 1.0 and 0.0 <= r["bacc"] <= 1.0 for r in rows)
    assert all(r["params"] > 0 for r in rows)
    assert rows[0]["params"] > rows[1]["params"] and rows[3]["params"] == rows[1]["params"] + rows[2]["params"]
    test = json.loads((root / "data" / "dataset.json").read_text())["test"]
    per_image = read_csv(root / "eval" / "probabilities.csv")
    assert len(per_image) == len(test)
    assert [r["label"] for r in per_image] == [str(case["label"]) for case in test]
    for row in per_image:
        for net in ("teacher", "sp", "sf", "ensemble"):
            assert_probabilities(row, [f"{net}_no_lesion", f"{net}_lesion"])
        mean = (float(row["sp_lesion"]) + float(row["sf_lesion"])) / 2  # the ensemble: mean probabilities
        assert float(row["ensemble_lesion"]) == pytest.approx(mean, abs=2e-6)
    assert "val_auc_teacher" in (root / "eval" / "metrics.csv").read_text()
    pictures = ["roc.png", *(f"confusion_{net}.png" for net in ("teacher", "sp", "sf", "ensemble"))]
    assert all((root / "eval" / name).stat().st_size > 1000 for name in pictures)

    run_stage(BUNDLE, "evaluate", root, ensemble=False, overlays=False, output_dir=str(root / "eval_no_ensemble"))
    rows = json.loads((root / "eval_no_ensemble" / "results.json").read_text())
    assert [r["network"] for r in rows] == ["teacher", "sp", "sf"]
    assert not list((root / "eval_no_ensemble").glob("*.png"))  # --overlays False: no pictures


def test_inference_writes_one_row_per_image(trained):
    root = trained[0]
    run_stage(BUNDLE, "inference", root)
    test = json.loads((root / "data" / "dataset.json").read_text())["test"]
    rows = read_csv(latest_run(root / "eval" / "predictions") / "probabilities_sp.csv")
    assert [r["image"] for r in rows] == [str(root / "data" / case["image"]) for case in test]
    for row in rows:
        assert_probabilities(row, ["no_lesion", "lesion"])


def test_inference_skips_a_corrupt_file_and_says_so(trained):
    root = trained[0]
    new = root / "new"
    new.mkdir()
    (new / "a_good.png").write_bytes((root / "data" / "images" / "test_0000.png").read_bytes())
    (new / "b_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a PNG image")
    out = root / "out"
    run_stage(BUNDLE, "inference", root, input_dir=str(new), output_dir=str(out), network_name="teacher")
    rows = read_csv(latest_run(out) / "probabilities_teacher.csv")
    assert [r["image"] for r in rows] == [str(new / "a_good.png")]
    skipped = (latest_run(out) / "skipped.tsv").read_text().splitlines()
    assert len(skipped) == 1 and skipped[0].startswith(str(new / "b_corrupt.png"))


def test_presets_and_adapters_across_channels_and_sizes(trained):
    root = trained[0]
    # a shallower student: its feature map has other channels (22 vs 512) and another size (4x4 vs 2x2)
    trainer = run_stage(
        BUNDLE, "train", root, routes_preset="fitnets", ckpt_dir=str(root / "fitnets"),
        teacher_ckpt=str(root / "models" / "teacher.pt"), **{"student_def#block_config": [2, 2]},
    ).parser.get_parsed_content("train#trainer")  # fmt: skip
    assert set(iteration_losses(trainer.state.output)) == {
        "sp/sup", "sf/sup", "sp/total", "sf/total", "sp/feature_from_teacher", "sf/feature_from_teacher"
    }  # fmt: skip
    adapters = [m for m in trainer.routes.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(adapters) == 2 and all(a.out_channels == 512 and a.in_channels < 512 for a in adapters)
    assert all(math.isfinite(v) for v in iteration_losses(trainer.state.output).values())


def test_inference_output_of_each_network_is_kept(trained):
    root = trained[0]
    new, out = root / "new_formats", root / "out_networks"
    new.mkdir()
    (new / "a.png").write_bytes((root / "data" / "images" / "test_0001.png").read_bytes())
    (new / "b.jpg").write_bytes((root / "data" / "images" / "test_0002.png").read_bytes())  # a PNG named .jpg
    files = {}
    for name in ("sp", "sf", "ensemble"):  # the ensemble: the students' checkpoints, the mean of their probabilities
        run_stage(BUNDLE, "inference", root, input_dir=str(new), output_dir=str(out), network_name=name)
        files[name] = latest_run(out) / f"probabilities_{name}.csv"
    assert len({f.parent for f in files.values()}) == 3  # a folder per run, named by its network
    for name in ("sp", "sf"):
        rows = read_csv(files[name])
        assert [r["image"] for r in rows] == [str(new / "a.png"), str(new / "b.jpg")]
    sp, sf, ensemble = (read_csv(files[name]) for name in ("sp", "sf", "ensemble"))
    for a, b, mean in zip(sp, sf, ensemble, strict=True):
        columns = [k for k in mean if k != "image"]
        assert columns and all(abs((float(a[k]) + float(b[k])) / 2 - float(mean[k])) < 1e-5 for k in columns)


def test_a_datalist_without_validation_list_gets_one_held_out_class_by_class(tmp_path):
    from medkd.data.synthetic import ensure_classification_data

    datalist = tmp_path / "data" / "dataset.json"
    ensure_classification_data(str(datalist.parent), size=32, counts=(16, 8, 8))
    data = json.loads(datalist.read_text())
    data["training"] += data.pop("validation") + data.pop("test")
    datalist.write_text(json.dumps(data))
    workflow = run_stage(BUNDLE, "train_teacher", tmp_path, make_default_data=None)
    split = json.loads((tmp_path / "data" / "medkd_splits.json").read_text())
    assert workflow.parser.get_parsed_content("datalists")["validation"] == str(tmp_path / "data" / "medkd_splits.json")
    counts = {
        key: [sum(e["label"] == c for e in split[key]) for c in (0, 1)] for key in ("training", "validation", "test")
    }
    assert counts["validation"] == counts["test"] and min(counts["validation"]) >= 2  # 20% of each class
    assert sum(map(sum, counts.values())) == 32


def test_one_csv_file_for_every_list_is_split_not_scored_on_its_training_images(tmp_path, capsys):
    from medkd.data.synthetic import ensure_classification_data

    datalist = tmp_path / "data" / "dataset.json"
    ensure_classification_data(str(datalist.parent), size=32, counts=(16, 8, 8))
    data = json.loads(datalist.read_text())
    rows = [f"{e['image']},{e['label']}\n" for key in ("training", "validation", "test") for e in data[key]]
    (tmp_path / "data" / "all.csv").write_text("image,label\n" + "".join(rows))
    data_dir, names = str(tmp_path / "data"), ["no_lesion", "lesion"]  # a CSV file has no labels map
    datalists = dict.fromkeys(("training", "validation", "test"), f"{data_dir}/all.csv")
    with pytest.raises(SystemExit):  # the same file for every list, as given: the run stops before training
        run_stage(BUNDLE, "train_teacher", tmp_path, dataset_dir=data_dir, datalists=datalists, class_names=names)
    assert "[leakage] 32 image file(s) are in both the 'training' and the 'validation' list" in capsys.readouterr().err
    split = f"{data_dir}/medkd_splits.json"
    workflow = run_stage(
        BUNDLE, "train_teacher", tmp_path, dataset_dir=data_dir, datalist_file=f"{data_dir}/all.csv", class_names=names
    )
    assert workflow.parser.get_parsed_content("datalists") == dict.fromkeys(datalists, split)
    lists = json.loads(Path(split).read_text())
    assert [len(lists[key]) for key in datalists] == [20, 6, 6]


def test_a_csv_file_that_names_the_classes_needs_no_class_names(tmp_path):
    from medkd.data.synthetic import ensure_classification_data

    datalist = tmp_path / "data" / "dataset.json"
    ensure_classification_data(str(datalist.parent), size=32, counts=(16, 8, 8))
    data = json.loads(datalist.read_text())
    names = ["no_lesion", "lesion"]
    rows = [
        f"{e['image']},{names[e['label']]},{key}\n" for key in ("training", "validation", "test") for e in data[key]
    ]
    (tmp_path / "data" / "lists.csv").write_text("image,label,split\n" + "".join(rows))
    workflow = run_stage(BUNDLE, "train_teacher", tmp_path, datalist_file=str(tmp_path / "data" / "lists.csv"))
    assert workflow.parser.get_parsed_content("class_names") == ["lesion", "no_lesion"]  # sorted
    training = workflow.parser.get_parsed_content("train#datalist")
    assert [e["label"] for e in training] == [1 - e["label"] for e in data["training"]]
    assert (tmp_path / "models" / "teacher.pt").is_file()


def mixed_pictures(root, modes, n=24, classes=2):
    """A ``classes``-class image folder of PNG files whose modes cycle through ``modes`` (e.g. greyscale, RGBA,
    palette)."""
    from PIL import Image

    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    entries = []
    for i in range(n):
        pixels = (rng.random((36 + i % 5, 40)) * 100).astype(np.uint8)
        pixels[8:20, 8:20] = 250 * (i % classes) // max(classes - 1, 1)
        mode = modes[i % len(modes)]
        Image.fromarray(pixels).convert(mode).save(root / "images" / f"{i:02d}.png")
        entries.append({"image": f"images/{i:02d}.png", "label": i % classes})
    lists = {"training": entries[: n // 2], "validation": entries[n // 2 : 3 * n // 4], "test": entries[3 * n // 4 :]}
    names = {str(c): f"class{c}" for c in range(classes)}
    (root / "dataset.json").write_text(json.dumps({"labels": names, **lists}))
    return root


def test_pictures_of_mixed_modes_are_planned_and_trained_with_one_channel_count(tmp_path, capsys):
    from medkd.data.loading import load_datalist
    from medkd.planning.fingerprint import fingerprint_dataset

    data = mixed_pictures(tmp_path / "grey", ["L", "LA", "RGB", "L", "RGBA", "P"])
    tiny = {"patch_size": [32, 32], "batch_size": 4, "iterations_per_epoch": 2, "max_epochs": 1}
    workflow = run_stage(BUNDLE, "train_teacher", tmp_path / "run", dataset_dir=str(data), auto_plan=True, **tiny)
    plan = json.loads((data / "medkd_plan.json").read_text())
    assert plan["fingerprint"]["channels_seen"] == {"1": 12, "3": 6} and plan["fingerprint"]["pictures_converted"]
    assert plan["settings"]["in_channels"] == 1 == workflow.parser.get_parsed_content("in_channels")
    assert "PNG/JPEG/BMP, alpha left out): the most common; the others are converted to 1" in json.dumps(plan)
    assert "pictures of 3 channels are converted to the networks' 1 (in_channels)" in capsys.readouterr().out
    assert (tmp_path / "run" / "models" / "teacher.pt").is_file()
    colour = mixed_pictures(tmp_path / "colour", ["RGB", "RGBA", "L"])
    lists = {key: load_datalist(colour / "dataset.json", key) for key in ("training", "validation")}
    measured = fingerprint_dataset(lists, task="classification")
    assert measured["channels_seen"] == {"1": 6, "3": 12} and measured["in_channels"] == 3


def test_lists_without_a_class_accepted_on_request_still_choose_and_score_checkpoints(tmp_path):
    data = mixed_pictures(tmp_path / "data", ["L"], n=36, classes=3)
    lists = json.loads((data / "dataset.json").read_text())
    for key in ("validation", "test"):  # no image of class 2 in them
        lists[key] = [e for e in lists[key] if e["label"] != 2]
    (data / "dataset.json").write_text(json.dumps(lists))
    settings = {"dataset_dir": str(data), "allow_missing_classes": True, "patch_size": [32, 32], "batch_size": 4}
    run_stage(BUNDLE, "train_teacher", tmp_path, iterations_per_epoch=2, **settings)
    assert (tmp_path / "models" / "teacher.pt").is_file()  # chosen by the AUC over classes 0 and 1, not NaN
    run_stage(BUNDLE, "evaluate", tmp_path, networks="$dict(teacher=@teacher)", **settings)
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert [r["network"] for r in results] == ["teacher"] and math.isfinite(results[0]["auc"])


def test_the_3d_bundle_classifies_volumes_through_every_stage(tmp_path):
    """The 3D bundle (generated from this one): a 3D ResNet-18 teacher and 3D DenseNet students on NIfTI volumes."""
    teacher = run_stage("classification_3d", "train_teacher", tmp_path)
    assert teacher.parser.get_parsed_content("spatial_dims") == 3
    trainer = run_stage("classification_3d", "train", tmp_path).parser.get_parsed_content("train#trainer")
    assert all(math.isfinite(v) for v in iteration_losses(trainer.state.output).values())
    adapters = [m for m in trainer.routes.modules() if isinstance(m, torch.nn.Conv3d)]
    assert len(adapters) == 1  # the feature route of sf: a 1x1x1 adapter to the teacher's channels
    run_stage("classification_3d", "evaluate", tmp_path)
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert [r["network"] for r in rows] == ["teacher", "sp", "sf", "ensemble"]
    assert all(0.0 <= r["auc"] <= 1.0 for r in rows) and rows[0]["params"] > 30 * rows[1]["params"]
    run_stage("classification_3d", "inference", tmp_path)
    test = json.loads((tmp_path / "data" / "dataset.json").read_text())["test"]
    rows = read_csv(latest_run(tmp_path / "eval" / "predictions") / "probabilities_sp.csv")
    assert [r["image"] for r in rows] == [str(tmp_path / "data" / case["image"]) for case in test]
    assert all(case["image"].endswith(".nii.gz") for case in test)


def test_volumes_stored_in_other_orientations_reach_the_networks_the_same_way_round(tmp_path):
    """A lesion on the patient's left is on the same side of the input whatever the file's axis order (RAS or LPS)."""
    from monai.transforms import Compose

    from medkd.bundles import stage_config

    volume = np.zeros((16, 12, 8), np.float32)
    volume[2:5, 5:7, 3:5] = 1.0  # low x: the patient's right in RAS
    ras = np.diag([1.0, 1.0, 1.0, 1.0])
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps[:3, 3] = [15.0, 11.0, 0.0]  # the same grid in space, stored with x and y reversed
    nib.save(nib.Nifti1Image(volume, ras), tmp_path / "ras.nii.gz")
    nib.save(nib.Nifti1Image(volume[::-1, ::-1].copy(), lps), tmp_path / "lps.nii.gz")
    overrides = {"bundle_root": str(tmp_path), "auto_plan": False, "patch_size": [16, 12, 8], "class_names": ["a", "b"]}
    load = Compose(stage_config(BUNDLES / "classification_3d", "train", overrides).get_parsed_content("load"))
    a, b = (load({"image": str(tmp_path / f"{name}.nii.gz"), "label": 0})["image"] for name in ("ras", "lps"))
    assert torch.allclose(torch.as_tensor(a), torch.as_tensor(b))
