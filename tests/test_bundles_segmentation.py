"""The segmentation bundles: metadata, network shapes and every stage on tiny generated data."""

import csv
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_utils import BUNDLES, REPO, SCHEMA, STAGES, latest_run, mlflow_metrics, run_stage, stage_command
from monai.bundle import verify_metadata, verify_net_in_out

from medkd.data.synthetic import ensure_segmentation_data
from medkd.errors import user_error
from medkd.training.engines import iteration_losses
from medkd.training.nonfinite import NonFiniteLossError, NonFiniteOutputError

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
    terms = {k for k in iteration_losses(trainer.state.output) if "_from_" in k}  # peer features: weight 0
    # each bundle's default preset: diversified in 2D, its channel-wise form (diversified_cwd) in 3D
    teacher = ("channel", "channel") if bundle == "segmentation_3d" else ("prediction", "feature")
    assert terms == {f"sp/{teacher[0]}_from_teacher", f"sf/{teacher[1]}_from_teacher", "sp/prediction_from_sf",
                     "sf/prediction_from_sp"}  # fmt: skip
    for name in ("sp", "sf"):
        assert (tmp_path / "models" / f"{name}.pt").is_file()

    run_stage(bundle, "evaluate", tmp_path)
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert [r["network"] for r in rows] == ["teacher", "sp", "sf", "ensemble"]  # the students' ensemble too
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
        name = case["image"].split("/")[-1].replace(".nii.gz", "_sp_seg.nii.gz")
        seg = nib.load(latest_run(tmp_path / "eval" / "segmentations") / name)
        assert seg.shape == image.shape
        np.testing.assert_allclose(seg.affine, image.affine, atol=1e-5)
        assert set(np.unique(seg.get_fdata())) <= {0.0, 1.0, 2.0}
    run_stage(bundle, "inference", tmp_path, network_name="ensemble")  # the students' checkpoints, averaged
    for case in datalist["test"]:
        name = case["image"].split("/")[-1].replace(".nii.gz", "_ensemble_seg.nii.gz")
        seg = nib.load(latest_run(tmp_path / "eval" / "segmentations") / name)
        assert seg.shape == nib.load(tmp_path / "data" / case["image"]).shape


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
    out = latest_run(tmp_path / "out")
    assert (out / "a_good_sp_seg.nii.gz").is_file()
    odd = nib.load(out / "c_odd_sp_seg.nii.gz")
    assert odd.shape == (53, 41)
    np.testing.assert_allclose(odd.affine, odd_affine, atol=1e-5)
    assert not (out / "b_corrupt_sp_seg.nii.gz").exists()
    skipped = (out / "skipped.tsv").read_text().splitlines()
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
    test_scores = {f"val_{m}_{n}" for m in ("mean_dice", "hd95", "nsd") for n in ("sp", "sf", "ensemble")}
    assert len(runs) == 3 and test_scores in runs, runs  # + a run of the test scores


# ------------------------------------------------------------------------ NaN/Inf, inference inputs and outputs


@pytest.fixture(scope="module")
def trained_2d(tmp_path_factory):
    """The 2D bundle's teacher and students, trained for one epoch on tiny data."""
    root = tmp_path_factory.mktemp("segmentation_2d")
    run_stage("segmentation_2d", "train_teacher", root)
    run_stage("segmentation_2d", "train", root)
    return root


def copy_of(root, tmp_path):
    shutil.copytree(root, tmp_path / "bundle")
    return tmp_path / "bundle"


def tiny_data(root):
    """The tiny dataset the stages would generate, written now so that a test can spoil it first."""
    ensure_segmentation_data(str(root / "data"), spatial_dims=2, size=48, counts=(4, 2, 2))
    return json.loads((root / "data" / "dataset.json").read_text())


def put_nan(path, count=5):
    image = nib.load(path)
    array = image.get_fdata().astype(np.float32)
    array.flat[:count] = np.nan
    nib.save(nib.Nifti1Image(array, image.affine), path)


def user_error_of(error):
    found = user_error(error)
    assert found is not None, error
    return found


def test_pre_run_check_reports_a_nan_training_image(tmp_path, capsys):
    datalist = tiny_data(tmp_path)
    bad = tmp_path / "data" / datalist["training"][1]["image"]
    put_nan(bad, count=7)
    with pytest.raises(SystemExit) as err:
        run_stage("segmentation_2d", "train_teacher", tmp_path)
    assert err.value.code == 1
    assert f"{bad}: 7 non-finite image value(s) (NaN or Inf) out of 2304" in capsys.readouterr().err
    assert not (tmp_path / "models").exists()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_teacher_stage_nan_policy_raise_stops_and_skip_writes_finite_weights(tmp_path):
    nan_loss = "$lambda pred, label: pred.mean() * float('nan')"
    with pytest.raises(RuntimeError) as err:
        run_stage("segmentation_2d", "train_teacher", tmp_path, loss=nan_loss)
    error = err.value
    while error is not None and not isinstance(error, NonFiniteLossError):
        error = error.__cause__ or error.__context__
    assert isinstance(error, NonFiniteLossError), err.value
    assert "non-finite loss (nan) at epoch 1, iteration 1 (batch: " in str(error)
    assert "--nan_policy skip" in str(error)
    assert not (tmp_path / "models" / "teacher.pt").exists()

    with pytest.warns(UserWarning, match="skipping the step at epoch 1, iteration 1"):
        workflow = run_stage("segmentation_2d", "train_teacher", tmp_path, loss=nan_loss, nan_policy="skip")
    trainer = workflow.parser.get_parsed_content("train#trainer")
    guard = workflow.parser.get_parsed_content("train#handlers")[0]
    assert guard.skipped == trainer.state.iteration >= 1
    for name in ("teacher.pt", "last_teacher.pt"):
        weights = torch.load(tmp_path / "models" / name, weights_only=True)
        weights = weights.get("teacher", weights.get("network"))
        assert weights and all(torch.isfinite(v.float()).all() for v in weights.values()), name


def test_evaluation_stops_naming_a_nan_test_image(trained_2d, tmp_path, capsys):
    root = copy_of(trained_2d, tmp_path)
    datalist = json.loads((root / "data" / "dataset.json").read_text())
    bad = root / "data" / datalist["test"][1]["image"]
    put_nan(bad)
    with pytest.raises(SystemExit) as err:  # the test list is checked before evaluation starts
        run_stage("segmentation_2d", "evaluate", root)
    assert err.value.code == 1
    report = capsys.readouterr().err
    assert "[test] Data check failed" in report and f"{bad}: 5 non-finite image value(s)" in report
    assert {p.name for p in (root / "models").glob("*.pt")} >= {"teacher.pt", "sp.pt", "sf.pt"}
    # past the list check (e.g. a file changed while evaluating), the guard after loading names the file
    with pytest.raises(RuntimeError) as err:
        run_stage("segmentation_2d", "evaluate", root, initialize=[])
    message = str(user_error_of(err.value))
    assert message.startswith(f"Image file '{bad}' has 5 non-finite value(s) (NaN or Inf) out of 2304.")
    assert "numpy.nan_to_num" in message


def test_evaluating_some_networks_by_a_list_of_names_says_how_to_pick_them(trained_2d, tmp_path):
    root = copy_of(trained_2d, tmp_path)
    with pytest.raises(RuntimeError) as err:
        run_stage("segmentation_2d", "evaluate", root, networks=["teacher"])
    message = str(user_error_of(err.value))
    assert message.startswith("--networks must map names to networks, but it is ['teacher']. Evaluate the teacher")
    one_student = re.search(r'one student with --networks "\\(.+?)"', message).group(1)
    run_stage("segmentation_2d", "evaluate", root, networks=one_student)  # the suggestion, as the shell passes it
    assert [r["network"] for r in json.loads((root / "eval" / "results.json").read_text())] == ["sp"]
    for stage in ("evaluate", "inference"):  # a window the U-Nets' skip connections cannot take: named, as in training
        with pytest.raises(RuntimeError) as err:
            run_stage("segmentation_2d", stage, root, patch_size=[20, 20])
        assert str(user_error_of(err.value)).startswith("patch_size [20, 20] is not a multiple of [16, 16]")


def test_inference_without_input_images_is_an_error(trained_2d, tmp_path):
    root = copy_of(trained_2d, tmp_path)
    missing = tmp_path / "no_such_folder"
    cmd = stage_command("segmentation_2d", "inference", root, input_dir=str(missing))
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run(
        cmd, capture_output=True, text=True, encoding="utf-8", errors="replace", env=env, cwd=root, timeout=300
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert f"ERROR: Input folder '{missing}' does not exist. Pass --input_dir the folder" in result.stderr
    assert "Traceback" not in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(RuntimeError) as err:
        run_stage("segmentation_2d", "inference", root, input_dir=str(empty))
    assert str(user_error_of(err.value)).startswith(
        f"Input folder '{empty}' holds no image in a supported format (NIfTI (.nii, .nii.gz), DICOM"
    )
    assert "it holds 1 file(s) and 0 folder(s): notes.txt" in str(user_error(err.value))


def test_inference_reads_nifti_png_dicom_and_keeps_each_networks_output(trained_2d, tmp_path):
    from PIL import Image
    from pydicom.data import get_testdata_file

    root = copy_of(trained_2d, tmp_path)
    new, out = tmp_path / "new", tmp_path / "out"
    new.mkdir()
    test_image = root / "data" / "images" / "test_000.nii.gz"
    (new / "a.nii.gz").write_bytes(test_image.read_bytes())
    pixels = nib.load(test_image).get_fdata()
    Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8)).save(new / "b.png")
    (new / "c.dcm").write_bytes(Path(get_testdata_file("CT_small.dcm", download=False)).read_bytes())
    (new / "d_nan.nii.gz").write_bytes(test_image.read_bytes())
    put_nan(new / "d_nan.nii.gz")
    (new / "notes.txt").write_text("not an image")

    run_stage("segmentation_2d", "inference", root, input_dir=str(new), output_dir=str(out))
    sp = latest_run(out)
    written = {p.name: p.read_bytes() for p in sp.glob("*.nii.gz")}
    assert set(written) == {"a_sp_seg.nii.gz", "b_sp_seg.nii.gz", "c_sp_seg.nii.gz"}
    assert nib.load(sp / "b_sp_seg.nii.gz").shape == (48, 48) and nib.load(sp / "c_sp_seg.nii.gz").shape == (128, 128)
    skipped = (sp / "skipped.tsv").read_text().splitlines()
    nan_file = new / "d_nan.nii.gz"
    assert len(skipped) == 1 and skipped[0].startswith(f"{nan_file}\tImage file '{nan_file}' has 5 non-finite")

    run_stage("segmentation_2d", "inference", root, input_dir=str(new), output_dir=str(out), network_name="sf")
    sf = latest_run(out)
    assert {p.name for p in sf.glob("*_sf_seg.nii.gz")} == {"a_sf_seg.nii.gz", "b_sf_seg.nii.gz", "c_sf_seg.nii.gz"}
    assert all((sp / name).read_bytes() == data for name, data in written.items())  # sp's are untouched


def test_inference_names_the_network_with_non_finite_output(trained_2d, tmp_path):
    root = copy_of(trained_2d, tmp_path)
    weights = torch.load(root / "models" / "sp.pt", weights_only=True)
    first = next(k for k, v in weights["sp"].items() if v.is_floating_point())
    weights["sp"][first].fill_(float("nan"))
    torch.save(weights, root / "models" / "sp.pt")
    with pytest.raises(RuntimeError) as err:
        run_stage("segmentation_2d", "inference", root)
    message = str(user_error_of(err.value))
    assert isinstance(user_error(err.value), NonFiniteOutputError)
    assert message.startswith(f"network 'sp' gave non-finite output (NaN or Inf) for image '{root / 'data' / 'images'}")
    assert f"{root}/models/sp.pt" in message


def test_validation_split_without_a_class_is_accepted_on_request(tmp_path, capsys):
    datalist = tiny_data(tmp_path)
    for case in datalist["validation"]:
        path = tmp_path / "data" / case["label"]
        label = nib.load(path)
        nib.save(nib.Nifti1Image(np.minimum(label.get_fdata(), 1).astype(np.uint8), label.affine), path)
    with pytest.raises(SystemExit):
        run_stage("segmentation_2d", "train_teacher", tmp_path)
    report = capsys.readouterr().err
    assert "[validation]" in report and "class 2 never appears in any label map" in report
    assert "--allow_missing_classes True" in report
    run_stage("segmentation_2d", "train_teacher", tmp_path, allow_missing_classes=True)
    assert (tmp_path / "models" / "teacher.pt").is_file()


def test_label_maps_in_other_values_train_the_same_and_are_written_back_in_them(tmp_path, capsys):
    """Label maps holding 0/127/255 with the labels map {"0", "127", "255"} train exactly as 0/1/2 maps do, and the
    written segmentations hold the datalist's values."""
    values = [0, 127, 255]
    plain, mapped = tmp_path / "plain", tmp_path / "mapped"
    tiny_data(plain)
    datalist = tiny_data(mapped)
    for path in (mapped / "data" / "labels").iterdir():
        label = nib.load(path)
        array = np.take(values, label.get_fdata().astype(int)).astype(np.uint8)
        nib.save(nib.Nifti1Image(array, label.affine), path)
    datalist["labels"] = {str(v): name for v, name in zip(values, datalist["labels"].values(), strict=True)}
    (mapped / "data" / "dataset.json").write_text(json.dumps(datalist))

    trained = {root: run_stage("segmentation_2d", "train_teacher", root) for root in (plain, mapped)}
    assert trained[mapped].parser.get_parsed_content("label_values") == values
    assert trained[plain].parser.get_parsed_content("label_values") == [0, 1, 2]
    sample = trained[mapped].parser.get_parsed_content("validate#dataset")[0]  # a whole image
    assert set(np.unique(sample["label"].numpy())) == {0.0, 1.0, 2.0}
    best = {root: torch.load(root / "models" / "teacher.pt", weights_only=True) for root in (plain, mapped)}
    assert best[mapped]["metric"] == best[plain]["metric"]
    for name, tensor in best[plain]["teacher"].items():
        torch.testing.assert_close(best[mapped]["teacher"][name], tensor, rtol=0, atol=0, msg=name)
    assert best[mapped]["fingerprint"]["label_values"] == values and "label_values" not in best[plain]["fingerprint"]

    for root in (plain, mapped):
        run_stage("segmentation_2d", "inference", root, network_name="teacher", output_dir=str(root / "out"))
    for written in sorted(latest_run(plain / "out").glob("*_seg.nii.gz")):
        indices = np.asarray(nib.load(written).dataobj)
        in_values = nib.load(latest_run(mapped / "out") / written.name)
        assert in_values.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(np.asarray(in_values.dataobj), np.take(values, indices))

    label = mapped / "data" / datalist["training"][0]["label"]
    array = np.asarray(nib.load(label).dataobj).copy()
    array[:2, :2] = 3
    nib.save(nib.Nifti1Image(array, nib.load(label).affine), label)
    with pytest.raises(SystemExit):
        run_stage("segmentation_2d", "train_teacher", mapped, resume=False)
    report = capsys.readouterr().err
    assert f"{label}: label values [3] are not among the classes' values [0, 127, 255]" in report


def test_a_decathlon_datalist_without_validation_and_with_an_unlabelled_test_list_runs(tmp_path):
    """A Medical Segmentation Decathlon dataset.json (training list, test list of bare image paths): every stage reads
    one split file holding validation and test lists held out of the training list."""
    datalist = tiny_data(tmp_path)
    cases = datalist["training"] + datalist["validation"] + datalist["test"]
    decathlon = {"labels": datalist["labels"], "training": cases, "test": [c["image"] for c in datalist["test"]]}
    (tmp_path / "data" / "dataset.json").write_text(json.dumps(decathlon))
    teacher = run_stage("segmentation_2d", "train_teacher", tmp_path)
    split = tmp_path / "data" / "medkd_splits.json"
    lists = ("training", "validation", "test")
    assert teacher.parser.get_parsed_content("datalists") == dict.fromkeys(lists, str(split))
    held = json.loads(split.read_text())
    assert [len(held[key]) for key in lists] == [5, 1, 2]
    assert len(teacher.parser.get_parsed_content("train#datalist")) == 5
    run_stage("segmentation_2d", "train", tmp_path)
    run_stage("segmentation_2d", "evaluate", tmp_path)
    scored = {row["filename"] for row in csv.DictReader((tmp_path / "eval" / "val_mean_dice_sp_raw.csv").open())}
    assert scored == {str(tmp_path / "data" / case["image"]) for case in held["test"]}


def test_an_nnunet_v2_raw_dataset_runs_as_it_is(tmp_path):
    """nnU-Net v2's raw layout: imagesTr/<case>_0000.nii.gz, labelsTr/<case>.nii.gz, a dataset.json without case list
    and with a labels map from names to values; here two channels (files) per case, which inference on a folder of new
    cases groups the same way, naming each output after its case."""
    datalist = tiny_data(tmp_path)
    data = tmp_path / "data"
    for folder in ("imagesTr", "labelsTr"):
        (data / folder).mkdir()
    for i, case in enumerate(datalist["training"] + datalist["validation"] + datalist["test"]):
        image = nib.load(data / case["image"])
        nib.save(nib.Nifti1Image(1.0 - image.get_fdata(), image.affine), data / "imagesTr" / f"case{i}_0001.nii.gz")
        (data / case["image"]).rename(data / "imagesTr" / f"case{i}_0000.nii.gz")
        (data / case["label"]).rename(data / "labelsTr" / f"case{i}.nii.gz")
    names = {name: int(value) for value, name in datalist["labels"].items()}
    channels = {"0": "MRI", "1": "MRI inverted"}
    raw = {"channel_names": channels, "labels": names, "numTraining": 8, "file_ending": ".nii.gz"}
    (data / "dataset.json").write_text(json.dumps(raw))
    teacher = run_stage("segmentation_2d", "train_teacher", tmp_path, in_channels=2)
    assert teacher.parser.get_parsed_content("class_names") == list(names)
    held = json.loads((data / "medkd_splits.json").read_text())
    assert [len(held[key]) for key in ("training", "validation", "test")] == [5, 1, 2]
    assert held["training"][0]["image"][1].startswith("imagesTr/case") and held["training"][0]["image"][1].endswith(
        "_0001.nii.gz"
    )
    new, out = tmp_path / "new", tmp_path / "out"
    new.mkdir()
    for case in held["test"]:
        for f in case["image"]:
            shutil.copy(data / f, new / Path(f).name.replace("case", "new"))
    settings = {"in_channels": 2, "network_name": "teacher", "output_dir": str(out)}
    run_stage("segmentation_2d", "inference", tmp_path, input_dir=str(new), **settings)
    cases = sorted(Path(case["image"][0]).name.replace("case", "new").replace("_0000", "") for case in held["test"])
    written = sorted(p.name for p in latest_run(out).glob("*.nii.gz"))
    assert written == [c.replace(".nii.gz", "_teacher_seg.nii.gz") for c in cases]
    run_stage("segmentation_2d", "inference", tmp_path, **{**settings, "output_dir": str(tmp_path / "listed")})
    assert len(list(latest_run(tmp_path / "listed").glob("case?_teacher_seg.nii.gz"))) == 2
    (new / "other_0001.nii.gz").write_bytes((new / Path(cases[0].replace(".nii", "_0001.nii"))).read_bytes())
    with pytest.raises(RuntimeError) as err:
        run_stage("segmentation_2d", "inference", tmp_path, input_dir=str(new), **settings)
    assert str(user_error_of(err.value)).startswith(
        f"Input folder '{new}': the networks take 2 files per case, named like the cases of "
        f"'{data / 'medkd_splits.json'}' (<case>_0000.nii.gz/<case>_0001.nii.gz, e.g. {data / 'imagesTr'}/case"
    )
    assert "other_0001.nii.gz form no case. Add the missing files" in str(user_error_of(err.value))


def test_2d_slices_stored_with_a_third_axis_of_one_train_plan_and_infer_as_2d(tmp_path):
    """2D images and label maps saved as NIfTI (H, W, 1), as many converters write a slice."""
    from medkd.planning.planfile import make_plan

    datalist = tiny_data(tmp_path)
    data = tmp_path / "data"
    for case in datalist["training"] + datalist["validation"] + datalist["test"]:
        for path in (data / case["image"], data / case["label"]):
            stored = nib.load(path)
            nib.save(nib.Nifti1Image(np.asarray(stored.dataobj)[..., None], stored.affine), path)
    assert nib.load(data / datalist["test"][0]["image"]).shape == (48, 48, 1)
    run_stage("segmentation_2d", "train_teacher", tmp_path)
    assert (tmp_path / "models" / "teacher.pt").is_file()
    plan = make_plan(str(data / "dataset.json"), task="segmentation", device="cpu")  # medkd plan, no bundle
    assert plan["spatial_dims"] == 2 and len(plan["settings"]["patch_size"]) == 2
    new, out = tmp_path / "new", tmp_path / "out"
    new.mkdir()
    shutil.copy(data / datalist["test"][0]["image"], new / "slice.nii.gz")
    run_stage("segmentation_2d", "inference", tmp_path, input_dir=str(new), output_dir=str(out), network_name="teacher")
    assert nib.load(latest_run(out) / "slice_teacher_seg.nii.gz").shape == (48, 48)


def test_3d_patches_are_drawn_from_a_scan_without_foreground_whatever_its_intensities():
    """After CT normalisation most of a scan is below 0; a threshold on intensities would leave no centre for the
    negative patches of a scan without foreground (MONAI: 'No sampling location available')."""
    from monai.transforms import Compose

    from medkd.bundles import stage_config

    parser = stage_config(BUNDLES / "segmentation_3d", "train", {"patch_size": [8, 8, 8], "samples_per_volume": 2})
    crop = Compose(parser.get_parsed_content("crop"))
    scan = {"image": -torch.rand(1, 16, 16, 12) - 1.0, "label": torch.zeros(1, 16, 16, 12)}
    patches = crop(scan)
    assert len(patches) == 2 and all(p["image"].shape == (1, 8, 8, 8) for p in patches)
