"""The pictures an evaluation draws: segmentation overlays of every test case and of the worst ones, a page of the same
cases across runs, and a classification evaluation's ROC curves and confusion matrices."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from bundle_utils import run_stage
from ignite.engine import Engine
from monai.data import MetaTensor
from monai.metrics import compute_roc_auc
from monai.networks.utils import one_hot
from PIL import Image

from medkd.errors import ConfigError
from medkd.tools.class_pictures import ClassificationPictures, confusion_counts, roc_curve
from medkd.tools.overlays import WORST_PNG, SegmentationOverlays, foreground_slice, methods_page

NETWORKS = ["teacher", "sp", "sf", "ensemble"]
CLASSES = ["background", "axon", "myelin"]


def description(path):
    """The ``Description`` text of a PNG (the row titles of a gallery, in order)."""
    with Image.open(path) as image:
        return image.text.get("Description", "")


def assert_sane_png(path):
    with Image.open(path) as image:
        assert image.format == "PNG" and 300 <= image.width <= 1200 and 150 <= image.height <= 1600, image.size


def case(name, label, wrong=()):
    """A decollated evaluator output of one case: one-hot label and predictions, each network right but those in
    ``wrong``, which predict the background everywhere."""
    label = torch.as_tensor(label)[None]
    onehot = one_hot(label[None], num_classes=len(CLASSES))[0]
    image = MetaTensor(label.float() + 0.1 * torch.rand(label.shape), meta={"filename_or_obj": f"/d/{name}.nii.gz"})
    wrong_pred = one_hot(torch.zeros_like(label)[None], num_classes=len(CLASSES))[0]
    return {"image": image, "label": onehot, **{f"pred_{n}": wrong_pred if n in wrong else onehot for n in NETWORKS}}


def disc(size=32, radius=8):
    y, x = np.mgrid[:size, :size]
    label = np.zeros((size, size), dtype=np.int64)
    label[(y - size // 2) ** 2 + (x - size // 2) ** 2 < radius**2] = 1
    label[(y - size // 2) ** 2 + (x - size // 2) ** 2 < (radius // 2) ** 2] = 2
    return label


def evaluate(handler, cases):
    """Run ``handler`` on an engine whose iterations output ``cases``, one each."""
    engine = Engine(lambda engine, batch: batch)
    handler.attach(engine)
    engine.run([[c] for c in cases], max_epochs=1)


def test_segmentation_evaluation_draws_every_test_case_unless_told_not_to(tmp_path):
    run_stage("segmentation_2d", "train_teacher", tmp_path)
    run_stage("segmentation_2d", "train", tmp_path)
    run_stage("segmentation_2d", "evaluate", tmp_path)
    folder = tmp_path / "eval" / "overlays"
    test_list = json.loads((tmp_path / "data" / "dataset.json").read_text())["test"]
    tests = sorted(Path(entry["image"]).name.split(".")[0] for entry in test_list)
    assert sorted(p.stem for p in folder.glob("*.png") if p.name != WORST_PNG) == tests
    for path in folder.glob("*.png"):
        assert_sane_png(path)
    assert description(folder / WORST_PNG).count("students") == len(tests)
    run_stage("segmentation_2d", "evaluate", tmp_path, overlays=False, output_dir=str(tmp_path / "eval_plain"))
    assert (tmp_path / "eval_plain" / "results.json").is_file()
    assert not (tmp_path / "eval_plain" / "overlays").exists()


def test_worst_png_shows_the_case_the_students_get_wrong_first(tmp_path):
    handler = SegmentationOverlays(str(tmp_path), CLASSES, NETWORKS)
    cases = [case("right", disc()), case("students_wrong", disc(), wrong=("sp", "sf")), case("one", disc(), ["sf"])]
    evaluate(handler, cases)
    assert handler.scores == pytest.approx({"right": 1.0, "students_wrong": 0.0, "one": 0.5})
    order = [row.split(" ")[0] for row in description(tmp_path / "overlays" / WORST_PNG).split("; ")]
    assert order == ["students_wrong", "one", "right"]
    assert sorted(p.name for p in (tmp_path / "overlays").glob("*.png")) == [
        "one.png", "right.png", "students_wrong.png", WORST_PNG
    ]  # fmt: skip
    evaluate(handler, cases[:1])  # a second evaluation replaces the first one's pictures
    assert sorted(p.name for p in (tmp_path / "overlays").glob("*.png")) == ["right.png", WORST_PNG]


def test_a_3d_case_is_drawn_through_the_axial_slice_with_most_foreground(tmp_path):
    volume = np.zeros((32, 32, 12), dtype=np.int64)
    volume[..., 3], volume[..., 8] = disc(radius=4), disc(radius=10)
    assert foreground_slice(volume) == 8 and foreground_slice(np.zeros((4, 4, 6))) == 3
    handler = SegmentationOverlays(str(tmp_path), CLASSES, NETWORKS)
    evaluate(handler, [case("volume", volume, wrong=["teacher"])])
    drawn = np.load(tmp_path / "overlays" / "volume.npz")
    assert int(drawn["slice"]) == 8 and (drawn["label"] == 2).any() and (drawn["pred_sp"] == drawn["label"]).all()
    assert_sane_png(tmp_path / "overlays" / "volume.png")
    assert "slice 8 of 12" in description(tmp_path / "overlays" / "volume.png")


def test_methods_page_shows_the_same_cases_across_runs(tmp_path):
    for run, wrong in (("kd", ["ensemble"]), ("dml", [])):
        handler = SegmentationOverlays(str(tmp_path / run), CLASSES, NETWORKS)
        evaluate(handler, [case("a", disc()), case("b", disc(radius=12), wrong=wrong)])
    page = methods_page({"kd": tmp_path / "kd", "dml": tmp_path / "dml"}, tmp_path / "page.png", CLASSES)
    assert_sane_png(page)
    assert description(page) == "b; a"  # b: mean Dice 0.5 over the runs' ensembles, a: 1
    with pytest.raises(ConfigError, match="evaluate each run with overlays on"):
        methods_page({"kd": tmp_path / "kd"}, tmp_path / "page.png", CLASSES, cases=["c"])


def test_confusion_matrix_counts_and_roc_curves_of_hand_made_predictions(tmp_path):
    labels, predicted = np.array([0, 0, 1, 1, 1, 2, 2]), np.array([0, 1, 1, 1, 2, 2, 0])
    assert confusion_counts(labels, predicted, 3).tolist() == [[1, 1, 0], [0, 2, 1], [1, 0, 1]]
    rng = np.random.default_rng(0)
    scores, positive = rng.random(50).round(1), rng.random(50) < 0.4  # ties included
    assert roc_curve(positive, scores)[2] == pytest.approx(
        float(compute_roc_auc(torch.as_tensor(scores), torch.as_tensor(positive.astype(float))))
    )
    probabilities = np.eye(3)[predicted] * 0.8 + 0.1
    with open(tmp_path / "probabilities.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "label", *(f"{n}_{c}" for n in ("teacher", "sp") for c in "xyz")])
        for i, (label, p) in enumerate(zip(labels, probabilities, strict=True)):
            writer.writerow([f"{i}.png", label, *p, *p[::-1]])
    paths = ClassificationPictures(str(tmp_path / "probabilities.csv"), str(tmp_path), list("xyz"), ["teacher", "sp"])()
    assert [p.name for p in paths] == ["roc.png", "confusion_teacher.png", "confusion_sp.png"]
    for path in paths:
        assert_sane_png(path)
