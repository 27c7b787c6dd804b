"""HD95 and normalised surface Dice at the evaluate stage: values in the images' unit against hand-computed ones,
missed and absent classes, and their columns in results.md, the per-case CSV files and a comparison's tables."""

import csv
import json
import math
from types import SimpleNamespace

import pytest
import torch
from bundle_utils import run_stage
from monai.data import MetaTensor

from medkd.errors import ConfigError
from medkd.tools.gains import gain_cells, method_gains
from medkd.tools.report import ResultsTable, paired_gains, summarize
from medkd.training.surface_metrics import HD95Metric, NSDMetric, label_spacing, surface_tolerances


def one_hot(mask: torch.Tensor, spacing=None) -> torch.Tensor:
    """A batch of one two-class one-hot label map ``(1, 2, *spatial)`` of a binary ``mask``; with ``spacing``, a
    MetaTensor whose affine holds it."""
    maps = torch.stack([mask == 0, mask == 1]).float()[None]
    if spacing is None:
        return maps
    diagonal = torch.tensor([*spacing, *[1.0] * (4 - len(spacing))], dtype=torch.float64)
    return MetaTensor(maps, affine=torch.diag(diagonal))


def squares(offset: int) -> torch.Tensor:
    """A 4 x 4 square in a 12 x 12 image, ``offset`` pixels along the second axis."""
    mask = torch.zeros(12, 12)
    mask[2:6, 2 + offset : 6 + offset] = 1
    return mask


def scores(pred: torch.Tensor, label: torch.Tensor, tolerance: float) -> tuple[float, float]:
    """HD95 and NSD of one image and class."""
    hd95, nsd = HD95Metric(), NSDMetric([tolerance])
    return float(hd95(pred, label)), float(nsd(pred, label))


def test_two_squares_two_pixels_apart_at_half_a_millimetre():
    # edge pixels of the label square: the 4 of its far side are 2 pixels (1.0 mm) from the other square's edge,
    # the 8 others within 1 pixel (0.5 mm); the same the other way: HD95 1.0 mm, NSD at 0.5 mm 16 / 24
    hd95, nsd = scores(one_hot(squares(2), [0.5, 0.5]), one_hot(squares(0), [0.5, 0.5]), tolerance=0.5)
    assert hd95 == pytest.approx(1.0)
    assert nsd == pytest.approx(2 / 3)
    assert scores(one_hot(squares(2), [0.5, 0.5]), one_hot(squares(0), [0.5, 0.5]), tolerance=1.0)[1] == 1.0


def test_a_prediction_equal_to_the_label_scores_zero_and_one():
    label = one_hot(squares(0), [0.5, 0.5])
    assert scores(label, label, tolerance=0.1) == (0.0, 1.0)


def bars(spatial: tuple[int, ...], rows: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two one-pixel-thick bars (plates in 3D) across the middle of the other axes, ``rows`` apart along axis 0:
    every pixel of each is its surface, at the same distance from the other."""
    pred, label = torch.zeros(spatial), torch.zeros(spatial)
    middle = tuple(slice(2, n - 2) for n in spatial[1:])
    pred[(rows[0], *middle)], label[(rows[1], *middle)] = 1, 1
    return pred, label


@pytest.mark.parametrize(
    "spatial, spacing, distance",
    [
        ((12, 12), [2.0, 0.5], 6.0),  # 3 rows of 2 mm: anisotropic, along the coarse axis
        ((12, 12), [0.5, 2.0], 1.5),  # the same bars along the fine axis
        ((8, 8, 8), [1.5, 0.8, 0.8], 4.5),  # 3D plates 3 slices of 1.5 mm apart
    ],
)
def test_distances_are_in_the_units_of_the_label_affine(spatial, spacing, distance):
    pred, label = bars(spatial, rows=(5, 2))
    hd95, nsd = scores(one_hot(pred, spacing), one_hot(label, spacing), tolerance=distance)
    assert hd95 == pytest.approx(distance)
    assert nsd == 1.0
    assert scores(one_hot(pred, spacing), one_hot(label, spacing), tolerance=0.99 * distance)[1] == 0.0
    assert scores(one_hot(pred), one_hot(label), tolerance=3.0)[0] == pytest.approx(3.0)  # plain tensors: pixels


def test_label_spacing_of_a_batch():
    assert label_spacing(one_hot(squares(0), [0.5, 2.0])) == [[0.5, 2.0]]
    assert label_spacing(one_hot(squares(0))) is None


def test_a_missed_class_is_infinite_and_an_absent_class_nan_and_both_are_left_out_of_the_mean():
    empty, square = torch.zeros(12, 12), squares(0)
    hd95, nsd = HD95Metric(), NSDMetric([0.5])
    for pred, label in [(square, square), (empty, square), (square, empty), (empty, empty)]:
        hd95(one_hot(pred, [0.5, 0.5]), one_hot(label, [0.5, 0.5]))
        nsd(one_hot(pred, [0.5, 0.5]), one_hot(label, [0.5, 0.5]))
    values = hd95.get_buffer().flatten().tolist()
    assert values[:3] == [0.0, math.inf, math.inf] and math.isnan(values[3])
    assert nsd.get_buffer().flatten().tolist()[:3] == [1.0, 0.0, 0.0] and math.isnan(nsd.get_buffer()[3, 0])
    assert float(hd95.aggregate()) == 0.0  # the mean of the finite distances
    assert float(nsd.aggregate()) == pytest.approx(1 / 3)


def test_surface_tolerances():
    assert surface_tolerances(None, [0.5, 2.0], ["a", "b"]) == [2.0, 2.0]  # one voxel of the coarsest axis
    assert surface_tolerances(1, [0.5, 0.5], ["a", "b"]) == [1.0, 1.0]
    assert surface_tolerances([1, 3.5], 0.5, ["a", "b"]) == [1.0, 3.5]
    for wrong in ([1.0], [1.0, -2.0], "1"):
        with pytest.raises(ConfigError, match=r"surface_tolerance_mm: .*one per foreground class \['a', 'b'\]"):
            surface_tolerances(wrong, [0.5, 0.5], ["a", "b"])


def test_results_table_leaves_infinite_distances_out_and_counts_them():
    table = ResultsTable("unused", class_names=["a", "b"], surface_tolerances=[0.5, 1.0])
    details = {"val_hd95_sp": torch.tensor([[1.0, math.inf], [3.0, 2.0], [math.inf, math.nan]])}
    row = table.rows({"val_hd95_sp": 2.0}, details)[0]
    assert row["hd95:a"] == 2.0 and row["hd95:b"] == 2.0
    assert table.infinite_note(details).startswith("Infinite scores (hd95 of sp: a in 1 of 3, b in 1 of 3) are")
    assert table.infinite_note({"val_hd95_sp": torch.ones(3, 2)}) == ""
    assert "(a 0.5, b 1; `surface_tolerance_mm`)" in table.surface_note()


def test_results_md_says_that_an_empty_prediction_is_infinite(tmp_path):
    empty, square = torch.zeros(12, 12), squares(0)
    hd95, nsd = HD95Metric(), NSDMetric([0.5])
    for pred in (square, empty):  # the second image: the network predicted nothing
        hd95(one_hot(pred, [0.5, 0.5]), one_hot(square, [0.5, 0.5]))
        nsd(one_hot(pred, [0.5, 0.5]), one_hot(square, [0.5, 0.5]))
    state = SimpleNamespace(
        metrics={"val_hd95_sp": float(hd95.aggregate()), "val_nsd_sp": float(nsd.aggregate())},
        metric_details={"val_hd95_sp": hd95.get_buffer(), "val_nsd_sp": nsd.get_buffer()},
    )
    ResultsTable(str(tmp_path), class_names=["a"], surface_tolerances=[0.5])(SimpleNamespace(state=state))
    assert json.loads((tmp_path / "results.json").read_text()) == [
        {"network": "sp", "hd95": 0.0, "hd95:a": 0.0, "nsd": 0.5, "nsd:a": 0.5}
    ]
    assert (
        "Infinite scores (hd95 of sp: a in 1 of 2) are images where only one of the prediction and the label"
        in (tmp_path / "results.md").read_text()
    )


def test_a_comparison_reports_hd95_and_nsd_and_counts_lower_distances_as_gains():
    rows = [
        {"preset": p, "seed": 1, "network": "sp", "mean_dice": 0.8, "hd95": d, "nsd": 0.7, "hd95:a": d}
        for p, d in (("student", 2.0), ("kd", 1.5))
    ]
    assert "| mean_dice | hd95 | hd95:a | nsd |" in summarize(rows)
    rows.append({"preset": "-", "seed": "-", "network": "teacher", "mean_dice": 0.9, "hd95": 1.0, "nsd": 0.8})
    gains = {g.metric: g for g in method_gains(rows, ["mean_dice", "hd95", "nsd"], {}, "student")}
    assert gain_cells(gains["hd95"])["seeds won"] == "1/1"  # kd's distance is 0.5 lower: a gain
    assert gain_cells(gains["hd95"])["gap recovered"] == "50%"  # half-way from 2.0 to the teacher's 1.0
    assert gain_cells(gains["mean_dice"])["seeds won"] == "0/1"
    assert "| kd | sp | 1 | -0.5000 | – | 1/1 | 50% |" in paired_gains(list(gains.values()))


def test_evaluate_writes_hd95_and_nsd_per_class_and_per_case_and_chooses_postprocessing(tmp_path):
    run_stage("segmentation_2d", "train_teacher", tmp_path)
    run_stage("segmentation_2d", "train", tmp_path)
    run_stage("segmentation_2d", "evaluate", tmp_path, surface_tolerance_mm=[1.0, 2.0], mirror_tta=True)
    results = (tmp_path / "eval" / "results.md").read_text()
    chosen = json.loads((tmp_path / "eval" / "postprocessing.json").read_text())  # chosen on the validation images
    assert set(chosen) == {"teacher", "sp", "sf", "ensemble"}
    assert all(isinstance(chosen[n]["mirror_tta"], bool) for n in ("teacher", "sp", "sf"))
    kept = any(entry["mirror_tta"] or entry["largest_component"] for entry in chosen.values())
    assert ("Post-processing chosen on the validation images" in results) == kept
    header = results.splitlines()[0]
    for column in ("hd95", "nsd", "hd95:dim_object", "nsd:bright_object"):
        assert f"| {column} |" in header
    assert "(dim_object 1, bright_object 2; `surface_tolerance_mm`)" in results
    history = (tmp_path / "eval" / "history_students.csv").read_text().splitlines()[0]
    assert "mean_dice" in history and "hd95" not in history and "nsd" not in history  # validation: Dice only
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert all(0.0 <= r["nsd"] <= 1.0 for r in rows)
    for metric in ("hd95", "nsd"):
        per_case = list(csv.DictReader((tmp_path / "eval" / f"val_{metric}_sp_raw.csv").open()))
        assert list(per_case[0]) == ["filename", "dim_object", "bright_object", "mean"]
        finite = [float(c["dim_object"]) for c in per_case if math.isfinite(float(c["dim_object"]))]
        mean = sum(finite) / len(finite) if finite else math.nan  # a class every image missed: no mean
        assert rows[1][f"{metric}:dim_object"] == pytest.approx(mean, abs=1e-6, nan_ok=True)
