"""Tests for medkd.data.checks: datalist checks, the check-data CLI and skipping corrupt files at inference."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medkd.__main__ import main
from medkd.data.checks import Problem, assert_valid_datalist, check_before_run, check_datalist
from medkd.data.loading import DataError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
REPO = Path(__file__).resolve().parents[1]


def nifti(path: Path, array: np.ndarray, spacing=(1.0, 1.0), origin=(0.0, 0.0)) -> str:
    affine = np.eye(4)
    affine[[0, 1], [0, 1]] = spacing
    affine[:2, 3] = origin
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return str(path)


def label_map(values=(0, 1, 2), shape=(8, 8)) -> np.ndarray:
    label = np.zeros(shape, np.uint8)
    for i, v in enumerate(values):
        label[i, :] = v
    return label


@pytest.fixture
def seg_items(tmp_path) -> list[dict]:
    """Three valid 2D image/label pairs with classes 0, 1, 2."""
    items = []
    for i in range(3):
        image = nifti(tmp_path / f"img{i}.nii.gz", np.random.rand(8, 8).astype(np.float32))
        items.append({"image": image, "label": nifti(tmp_path / f"lbl{i}.nii.gz", label_map())})
    return items


def write_datalist(tmp_path: Path, items: list[dict], **extra) -> Path:
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": items, **extra}))
    return path


def test_valid_segmentation_datalist(seg_items):
    assert check_datalist(seg_items, num_classes=3) == []
    assert assert_valid_datalist(seg_items, num_classes=3) == seg_items


def test_problem_str():
    assert str(Problem("/data/a.nii.gz", "file not found")) == "/data/a.nii.gz: file not found"


def test_empty_dataset():
    assert check_datalist([], num_classes=2) == [
        Problem("<datalist>", "the dataset is empty: no entries to check or train on")
    ]


def test_every_segmentation_problem_is_reported(tmp_path, seg_items):
    img = np.random.rand(8, 8).astype(np.float32)
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(Path(seg_items[0]["image"]).read_bytes()[:-40])
    cases = {
        "missing": {"image": str(tmp_path / "missing.nii.gz"), "label": seg_items[0]["label"]},
        "corrupt": {"image": str(corrupt), "label": seg_items[0]["label"]},
        "shape": {"image": seg_items[0]["image"], "label": nifti(tmp_path / "shape.nii.gz", label_map(shape=(8, 9)))},
        "spacing": {"image": seg_items[0]["image"], "label": nifti(tmp_path / "sp.nii.gz", label_map(), (2.0, 1.0))},
        "origin": {"image": seg_items[0]["image"], "label": nifti(tmp_path / "or.nii.gz", label_map(), origin=(5, 0))},
        "range": {
            "image": nifti(tmp_path / "i.nii.gz", img),
            "label": nifti(tmp_path / "r.nii.gz", label_map((0, 255))),
        },
        "float": {"image": seg_items[0]["image"], "label": nifti(tmp_path / "f.nii.gz", label_map().astype(float) / 2)},
    }
    problems = check_datalist([seg_items[1], *cases.values()], num_classes=4, class_names=["bg", "a", "b", "c"])
    text = [str(p) for p in problems]
    expected = [
        (cases["missing"]["image"], "file not found"),
        (str(corrupt), "unreadable or corrupt file"),
        (cases["shape"]["label"], "label shape [8, 9] differs from image shape [8, 8]"),
        (cases["spacing"]["label"], "label spacing [2.0, 1.0] differs from image spacing [1.0, 1.0]"),
        (cases["origin"]["label"], "label origin/orientation differ from the image"),
        (cases["range"]["label"], "label values [255] outside 0..3; a 0/255 mask: divide it by 255, or give each"),
        (cases["float"]["label"], "non-integer label values (e.g. [0.5])"),
        ("<datalist>", "class 3 ('c') never appears in any label map"),
    ]
    for path, reason in expected:
        assert any(t.startswith(f"{path}: ") and reason in t for t in text), (path, reason, text)
    assert len(problems) == len(expected)


def test_classification_checks(tmp_path):
    image = nifti(tmp_path / "img.nii.gz", np.zeros((4, 4), np.float32))
    items = [{"image": image, "label": 0}, {"image": image, "label": 5}, {"image": image, "label": "cat"}]
    problems = check_datalist(items, num_classes=3, task="classification", class_names=["neg", "pos", "unk"])
    assert [str(p) for p in problems] == [
        f"{image}: label 5 outside 0..2",
        f"{image}: label 'cat' is not an integer class index",
        "<datalist>: class 1 ('pos') has no sample",
        "<datalist>: class 2 ('unk') has no sample",
    ]


def test_labels_without_label_key_are_reported_and_test_lists_skip_labels(tmp_path, seg_items):
    problems = check_datalist([seg_items[0], {"image": seg_items[1]["image"]}], num_classes=3)
    assert problems == [Problem(seg_items[1]["image"], "has no 'label' while other entries do (entry 1)")]
    assert check_datalist([{"image": it["image"]} for it in seg_items], num_classes=3) == []


def test_assert_valid_datalist_lists_all_problems(tmp_path, seg_items):
    items = [*seg_items, {"image": str(tmp_path / "gone.nii.gz"), "label": seg_items[0]["label"]}]
    path = write_datalist(tmp_path, items)
    with pytest.raises(DataError) as err:
        assert_valid_datalist(path, num_classes=4)
    lines = str(err.value).splitlines()
    assert lines[0] == f"Data check failed: 2 problem(s) in {path}:"
    assert lines[1].startswith(f"  - {tmp_path / 'gone.nii.gz'}: file not found (check the path;")
    assert lines[2] == f"  - {path}: class 3 never appears in any label map"
    assert "python -m medkd check-data" in lines[3]


def test_assert_valid_datalist_from_bundle_config(tmp_path, seg_items):
    from monai.bundle import ConfigParser

    path = write_datalist(tmp_path, seg_items)
    config = {
        "imports": ["$import medkd", "$import medkd.data.checks"],
        "train_files": f"$medkd.data.checks.assert_valid_datalist('{path}', num_classes=3)",
        "initialize": [f"$medkd.data.checks.assert_valid_datalist('{path}', num_classes=4)"],
    }
    parser = ConfigParser(config)
    assert len(parser.get_parsed_content("train_files")) == 3
    with pytest.raises(RuntimeError) as err:  # ConfigParser wraps the DataError
        parser.get_parsed_content("initialize")
    assert isinstance(err.value.__cause__, DataError) and "class 3 never appears" in str(err.value.__cause__)


# ----------------------------------------------------------------------------------------------------------- CLI


def test_cli_ok(tmp_path, seg_items, capsys):
    path = write_datalist(tmp_path, seg_items, labels={"0": "background", "1": "liver", "2": "tumour"})
    assert main(["check-data", "--datalist", str(path)]) == 0  # num_classes taken from the Decathlon labels
    assert capsys.readouterr().out.strip() == "OK: 3 items checked"


def test_cli_reports_problems(tmp_path, seg_items, capsys):
    csv = tmp_path / "data.csv"
    csv.write_text("image,label\n" + "".join(f"{Path(i['image']).name},{Path(i['label']).name}\n" for i in seg_items))
    csv.write_text(csv.read_text() + "missing.nii.gz,lbl0.nii.gz\n")
    code = main(["check-data", "--datalist", str(csv), "--num-classes", "2", "--class-names", "bg,fg"])
    out = capsys.readouterr().out
    assert code == 1
    assert f"{tmp_path / 'missing.nii.gz'}: file not found" in out
    assert f"{tmp_path / 'lbl0.nii.gz'}: label values [2] outside 0..1" in out
    assert out.count("outside 0..1") == 4


def test_cli_malformed_datalist(tmp_path, capsys):
    path = tmp_path / "datalist.json"
    path.write_text('{"validation": []}')
    assert main(["check-data", "--datalist", str(path)]) == 1
    assert f"ERROR: Datalist '{path}' has no 'training' list" in capsys.readouterr().out
    assert main(["check-data", "--datalist", str(path), "--key", "validation"]) == 1
    assert "the dataset is empty" in capsys.readouterr().out


def test_cli_module_entry_point(tmp_path, seg_items):
    path = write_datalist(tmp_path, [*seg_items, {"image": "nope.nii.gz", "label": seg_items[0]["label"]}])
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "medkd", "check-data", "--datalist", str(path), "--num-classes", "3"]
    result = subprocess.run(
        cmd, capture_output=True, text=True, encoding="utf-8", errors="replace", env=env, cwd=tmp_path, timeout=120
    )
    assert result.returncode == 1, result.stderr
    assert f"{tmp_path / 'nope.nii.gz'}: file not found" in result.stdout
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------------------- NaN/Inf, task, missing classes


def test_nan_pixels_are_reported_per_file(tmp_path, seg_items, capsys):
    image = np.random.rand(8, 8).astype(np.float32)
    image[0, :3] = np.nan
    image[1, 0] = np.inf
    label = label_map().astype(np.float32)
    label[2, 2] = np.nan
    items = [
        {"image": nifti(tmp_path / "nan_img.nii.gz", image), "label": seg_items[0]["label"]},
        {"image": seg_items[1]["image"], "label": nifti(tmp_path / "nan_lbl.nii.gz", label)},
    ]
    problems = [str(p) for p in check_datalist(items, num_classes=3)]
    assert problems == [
        f"{items[0]['image']}: 4 non-finite image value(s) (NaN or Inf) out of 64; replace them with a number "
        "(e.g. numpy.nan_to_num) and save the file again, or remove it from the datalist",
        f"{items[1]['label']}: 1 non-finite label value(s) (NaN or Inf) out of 64; replace them with a number "
        "(e.g. numpy.nan_to_num) and save the file again, or remove it from the datalist",
    ]
    path = write_datalist(tmp_path, items)
    assert main(["check-data", "--datalist", str(path), "--num-classes", "3"]) == 1
    out = capsys.readouterr().out
    assert f"{items[0]['image']}: 4 non-finite image value(s)" in out and "nan_lbl.nii.gz: 1 non-finite" in out


def test_cli_infers_classification_from_integer_labels(tmp_path, capsys):
    image = nifti(tmp_path / "img.nii.gz", np.zeros((4, 4), np.float32))
    (tmp_path / "cls.csv").write_text(f"image,label\n{image},0\n{image},1\n{image},3\n")
    assert main(["check-data", "--datalist", str(tmp_path / "cls.csv"), "--num-classes", "3"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("Task: classification (every label is a class index or name; pass --task to override)")
    assert f"{image}: label 3 outside 0..2" in out and "class 2 has no sample" in out
    assert "not a label-map path" not in out  # what checking the integers as segmentation labels said


def test_cli_reads_json_labels_written_as_numbers_in_strings(tmp_path, capsys):
    image = nifti(tmp_path / "img.nii.gz", np.zeros((4, 4), np.float32))
    path = tmp_path / "cls.json"
    path.write_text(json.dumps({"training": [{"image": image, "label": "0"}, {"image": image, "label": "1"}]}))
    assert main(["check-data", "--datalist", str(path), "--num-classes", "2"]) == 0
    assert capsys.readouterr().out.startswith("Task: classification")  # not label maps named "0" and "1"
    path.write_text(json.dumps({"training": [{"image": image, "label": "0"}, {"image": image, "label": "1.0"}]}))
    assert main(["check-data", "--datalist", str(path)]) == 1
    assert capsys.readouterr().out == (
        f"ERROR: Datalist '{path}': the label '1.0' of entry 1 of 'training' is neither a class index nor the path of "
        'a label map. Write classification labels as integer class indices (1, not "1.0") or class names.\n'
    )


def test_allow_missing_classes_in_validation_only(tmp_path, seg_items, caplog, capsys):
    image = nifti(tmp_path / "img01.nii.gz", np.random.rand(8, 8).astype(np.float32))
    two_classes = {"image": image, "label": nifti(tmp_path / "l01.nii.gz", label_map((0, 1)))}
    path = write_datalist(tmp_path, seg_items, validation=[two_classes])
    with pytest.raises(SystemExit) as err:
        check_before_run(path, num_classes=3)
    assert err.value.code == 1
    report = capsys.readouterr().err
    assert f"[validation] Data check failed: 1 problem(s) in {path}:" in report
    assert "class 2 never appears in any label map" in report and "--allow_missing_classes True" in report
    with caplog.at_level(logging.WARNING, logger="medkd.data.checks"):
        check_before_run(path, num_classes=3, allow_missing_classes=True)  # no exit
    assert f"{path} ['validation']: class 2 never appears in any label map; accepted (allow_missing_classes)" in (
        caplog.text
    )
    path = write_datalist(tmp_path, [two_classes], validation=seg_items)
    with pytest.raises(SystemExit):  # a class absent from the training list stays an error
        check_before_run(path, num_classes=3, allow_missing_classes=True)
    assert "[training] Data check failed" in capsys.readouterr().err
    path = write_datalist(tmp_path, [two_classes])
    assert main(["check-data", "--datalist", str(path), "--num-classes", "3", "--allow-missing-classes"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"WARNING: {path} ['training']: class 2 never appears in any label map; accepted (allow_missing_classes): "
        "validation Dice leaves it out of the mean",
        "OK: 1 items checked",
    ]


def test_a_0_255_mask_is_not_told_to_allow_missing_classes(tmp_path, seg_items, capsys):
    image = nifti(tmp_path / "img01.nii.gz", np.random.rand(8, 8).astype(np.float32))
    mask = {"image": image, "label": nifti(tmp_path / "l01.nii.gz", label_map((0, 255)))}
    with pytest.raises(SystemExit):
        check_before_run(write_datalist(tmp_path, seg_items, validation=[mask]), num_classes=3)
    report = capsys.readouterr().err
    assert "a 0/255 mask: divide it by 255" in report and "class 1 never appears" in report
    assert "--allow_missing_classes" not in report  # the classes are hidden under 255, not missing


def test_check_before_run_reads_a_file_per_list(tmp_path, seg_items, capsys):
    training = write_datalist(tmp_path, seg_items[:2], test=seg_items[2:])
    validation = tmp_path / "validation.csv"
    image = nifti(tmp_path / "img_v.nii.gz", np.random.rand(8, 8).astype(np.float32))
    validation.write_text(f"image,label\n{image},{seg_items[0]['label']}\n{tmp_path / 'gone.nii.gz'},"
                          f"{seg_items[0]['label']}\n")  # fmt: skip
    datalists = {"training": training, "validation": validation, "test": training}
    with pytest.raises(SystemExit):
        check_before_run(datalists, num_classes=3)
    report = capsys.readouterr().err
    assert f"[validation] Data check failed: 1 problem(s) in {validation}:" in report and "gone.nii.gz" in report
    assert "[training]" not in report
    check_before_run(datalists, keys=["training", "test"], num_classes=3)  # no exit


def test_the_labels_map_gives_class_names_and_values_strictly_or_optionally(tmp_path):
    from medkd.data.labels import datalist_class_names, datalist_labels, optional_class_names, optional_label_values

    good = tmp_path / "dataset.json"
    good.write_text(json.dumps({"labels": {"1": "liver", "0": "background"}, "training": []}))
    brats = tmp_path / "brats.json"
    brats.write_text(json.dumps({"labels": {"4": "enhancing", "0": "background", "2": "edema", "1": "necrosis"}}))
    (tmp_path / "list.csv").write_text("image,label\n")
    assert datalist_class_names(str(good)) == optional_class_names(good) == ["background", "liver"]
    assert datalist_labels(brats) == {0: "background", 1: "necrosis", 2: "edema", 4: "enhancing"}  # value order
    assert datalist_class_names(brats) == ["background", "necrosis", "edema", "enhancing"]
    nnunet = tmp_path / "nnunet.json"
    nnunet.write_text(json.dumps({"labels": {"background": 0, "edema": 2, "necrosis": 1, "enhancing": 4}}))
    assert datalist_labels(nnunet) == datalist_labels(brats)  # nnU-Net v2's map from names to values
    assert optional_label_values({"training": brats, "test": good}) == [0, 1, 2, 4]  # the training list's
    assert optional_class_names({"training": good, "test": brats}) == ["background", "liver"]
    for unusable in (tmp_path / "list.csv", tmp_path / "missing.json", {"test": good}):
        assert optional_class_names(unusable) is None and optional_label_values(unusable) is None
    with pytest.raises(DataError, match=r"must number the classes 0..N-1 for classification .* got \[0, 1, 2, 4\]"):
        datalist_class_names(brats, task="classification")
    for labels, message in (
        ({"0": "background", "one": "liver"}, "must have integer keys"),
        ({"0": "background", "00": "liver"}, "distinct non-negative integer keys"),
        ({"-1": "ignore", "0": "background"}, "distinct non-negative integer keys"),
        ({"background": 0, "liver": 0}, "gives two classes one value"),
        ({"background": 0, "whole tumour": [1, 2, 3]}, "region-based labels"),
        ({}, "has no 'labels' map"),
    ):
        good.write_text(json.dumps({"labels": labels}))
        with pytest.raises(DataError, match=message):
            datalist_class_names(good)


def test_label_values_come_from_the_labels_map_and_map_both_ways(tmp_path):
    from medkd.data.labels import check_label_values, label_mapping, label_values, value_dtype
    from medkd.errors import ConfigError

    datalist = tmp_path / "dataset.json"
    datalist.write_text(json.dumps({"labels": {"0": "background", "127": "myelin", "255": "axon"}}))
    names = ["background", "myelin", "axon"]
    assert label_values(datalist, names) == [0, 127, 255]
    assert label_values(datalist, ["bg", "a", "b"]) == [0, 1, 2]  # other class names on the command line
    assert label_values(tmp_path / "list.csv", names) == [0, 1, 2]  # a datalist without labels map
    for bad in ([0, 127], [0, 127, 127], [0, -1, 2], [0, 1.5, 2], "012", [0, True, 2]):
        with pytest.raises(ConfigError, match="label_values .* must list 3 distinct non-negative integers"):
            check_label_values(bad, 3)
    label = np.array([[[0, 127], [255, 127]]], dtype=np.float32)
    to_indices = label_mapping("label", [0, 127, 255], 3)
    indices = to_indices({"label": label, "image": label})
    np.testing.assert_array_equal(indices["label"], [[[0, 1], [2, 1]]])
    np.testing.assert_array_equal(indices["image"], label)  # other keys untouched
    assert to_indices({"image": label}).keys() == {"image"}  # a stage without labels
    back = label_mapping("pred", [0, 127, 255], 3, to_values=True)({"pred": indices["label"]})
    np.testing.assert_array_equal(back["pred"], label)
    assert value_dtype([0, 1, 2]) is np.uint8 and value_dtype([0, 255]) is np.uint8
    assert value_dtype([0, 256]) is np.uint16 and value_dtype([0, 70000]) is np.uint32


def test_check_datalist_reads_label_maps_in_the_classes_values(tmp_path, capsys):
    image = nifti(tmp_path / "i.nii.gz", np.ones((8, 8), np.float32))
    items = [
        {"image": image, "label": nifti(tmp_path / f"l{k}.nii.gz", label_map(values))}
        for k, values in enumerate([(0, 1, 4), (0, 2), (0, 3)])
    ]
    names = ["background", "necrosis", "edema", "enhancing"]
    problems = [str(p) for p in check_datalist(items, 4, class_names=names, label_values=[0, 1, 2, 4])]
    assert problems == [
        f"{items[2]['label']}: label values [3] are not among the classes' values [0, 1, 2, 4] (the datalist's "
        "'labels' map or --label_values); add a class for each, or fix the label map"
    ]
    assert check_datalist(items[:2], 4, label_values=[0, 1, 2, 4]) == []  # value 4 counts as class 3
    problems = [str(p) for p in check_datalist(items[:1], 4, class_names=names, label_values=[0, 1, 2, 4])]
    assert problems == ["<datalist>: class 2 ('edema') never appears in any label map"]
    outside = [str(p) for p in check_datalist(items[:1], 4, label_values=[0, 1, 2, 3])]  # 0..N-1: as without values
    assert outside[0].startswith(f"{items[0]['label']}: label values [4] outside 0..3; if the label maps use other")
    datalist = tmp_path / "dataset.json"
    datalist.write_text(json.dumps({"labels": dict(zip(["0", "1", "2", "4"], names, strict=True)), "training": items}))
    capsys.readouterr()
    assert main(["check-data", "--datalist", str(datalist), "--no-duplicates"]) == 1  # values from the labels map
    out = capsys.readouterr().out
    assert "label values [3] are not among the classes' values [0, 1, 2, 4]" in out and "[4]" not in out


def test_an_image_in_two_lists_stops_the_run_naming_them(tmp_path, seg_items, caplog, capsys):
    one_list = tmp_path / "all.csv"  # one CSV for every list: the test list would be the training list
    one_list.write_text("image,label\n" + "".join(f"{e['image']},{e['label']}\n" for e in seg_items))
    with pytest.raises(SystemExit):
        check_before_run(dict.fromkeys(("training", "validation", "test"), one_list), num_classes=3)
    report = capsys.readouterr().err.splitlines()
    shown = ", ".join(e["image"] for e in seg_items)
    assert report[:3] == [
        f"ERROR: [leakage] 3 image file(s) are in both the 'training' and the 'validation' list: {shown}",
        f"ERROR: [leakage] 3 image file(s) are in both the 'training' and the 'test' list: {shown}",
        f"ERROR: [leakage] 3 image file(s) are in both the 'validation' and the 'test' list: {shown}",
    ]
    assert "--allow_leakage True runs anyway" in report[3]
    same_file = str(tmp_path / "." / Path(seg_items[2]["image"]).name)  # another spelling of one path
    path = write_datalist(
        tmp_path, seg_items[:2], validation=[{**seg_items[2], "image": same_file}], test=seg_items[2:]
    )
    check_before_run(path, num_classes=3, keys=["training"])  # no exit: no list shares an image with training
    with pytest.raises(SystemExit):
        check_before_run(path, num_classes=3, keys=["test"])  # the evaluation's check: test against the others
    assert capsys.readouterr().err.splitlines()[0] == (
        f"ERROR: [leakage] 1 image file(s) are in both the 'test' and the 'validation' list: {seg_items[2]['image']}"
    )
    with caplog.at_level(logging.WARNING, logger="medkd.data.checks"):
        check_before_run(path, num_classes=3, keys=["test"], allow_leakage=True)  # no exit
    assert "[leakage] 1 image file(s) are in both the 'test' and the 'validation' list" in caplog.text
    assert "accepted (allow_leakage)" in caplog.text


def test_a_label_in_another_orientation_of_the_same_grid_is_accepted(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.random((6, 5, 4)).astype(np.float32)
    label = (image > 0.5).astype(np.uint8)
    affine = np.diag([0.7, 0.8, 2.0, 1.0])
    affine[:3, 3] = [-20.0, 10.0, 5.0]
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "ras.nii.gz")
    lps = affine.copy()  # the same grid stored with its first two axes reversed (LPS), as ITK writes it
    for axis in (0, 1):
        lps[:3, 3] += (label.shape[axis] - 1) * affine[:3, axis]
        lps[:3, axis] *= -1
    nib.save(nib.Nifti1Image(np.flip(label, (0, 1)).copy(), lps), tmp_path / "lps.nii.gz")
    shifted = lps.copy()
    shifted[:3, 3] += [3.0, 0.0, 0.0]  # a label of another image: four voxels off
    nib.save(nib.Nifti1Image(np.flip(label, (0, 1)).copy(), shifted), tmp_path / "other.nii.gz")
    entry = {"image": str(tmp_path / "ras.nii.gz")}
    assert check_datalist([{**entry, "label": str(tmp_path / "lps.nii.gz")}], num_classes=2) == []
    (problem,) = check_datalist([{**entry, "label": str(tmp_path / "other.nii.gz")}], num_classes=2)
    assert "label origin/orientation differ from the image" in problem.reason


def test_check_data_and_plan_read_an_nnunet_raw_dataset(tmp_path, capsys):
    """nnU-Net v2's raw layout lists no cases in dataset.json; the bundles find them in its folders, and so do
    check-data and plan."""
    rng = np.random.default_rng(0)
    for folder in ("imagesTr", "labelsTr"):
        (tmp_path / folder).mkdir()
    for i in range(5):
        label = np.zeros((12, 12, 8), np.uint8)
        label[3:8, 4:9, 2:6] = 1
        nib.save(
            nib.Nifti1Image(rng.random((12, 12, 8)).astype(np.float32), np.eye(4)),
            tmp_path / "imagesTr" / f"c{i}_0000.nii.gz",
        )
        nib.save(nib.Nifti1Image(label, np.eye(4)), tmp_path / "labelsTr" / f"c{i}.nii.gz")
    raw = {
        "channel_names": {"0": "MRI"},
        "labels": {"background": 0, "organ": 1},
        "numTraining": 5,
        "file_ending": ".nii.gz",
    }
    (tmp_path / "dataset.json").write_text(json.dumps(raw))
    assert main(["check-data", "--datalist", str(tmp_path / "dataset.json")]) == 0
    assert "OK: 5 items checked" in capsys.readouterr().out
    assert main(["plan", "--dataset-dir", str(tmp_path)]) == 0
    assert "the lists are in" in capsys.readouterr().out and (tmp_path / "medkd_plan.json").is_file()


def test_a_list_without_labels_is_named_before_training_or_evaluation(tmp_path, seg_items, capsys):
    path = write_datalist(tmp_path, seg_items, test=[{"image": seg_items[0]["image"]}, *seg_items[1:2]])
    with pytest.raises(SystemExit):
        check_before_run(path, keys=["test"], num_classes=3, allow_leakage=True)
    assert f"ERROR: [test] 1 of the 2 entries of {path} ['test'] have no label (e.g. {seg_items[0]['image']}): " in (
        capsys.readouterr().err
    )


def test_a_classification_list_of_one_class_is_named_even_with_missing_classes_allowed(tmp_path, capsys):
    items = [{"image": str(tmp_path / f"{i}.png"), "label": i % 2} for i in range(4)]
    for item in items:
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(item["image"])
    path = write_datalist(tmp_path, items, validation=[{"image": items[1]["image"], "label": 1}])
    with pytest.raises(SystemExit):
        check_before_run(path, num_classes=2, task="classification", allow_missing_classes=True, allow_leakage=True)
    assert "['validation'] holds only class [1]: its AUC, which chooses the best checkpoints" in capsys.readouterr().err
