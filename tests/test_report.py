"""The evaluation results table: one row per network, per-class columns named by the classes."""

import locale
import math

import pytest
import torch
from torch import nn

from medkd.data.labels import foreground
from medkd.tools.report import NameClassColumns, ResultsTable, image_meta, markdown_table


def test_rows_per_network_with_named_per_class_means_skipping_nan(tmp_path):
    table = ResultsTable(str(tmp_path), networks={"sp": nn.Linear(2, 3)}, class_names=["liver", "tumour"])
    metrics = {"val_mean_dice_teacher": 0.9, "val_mean_dice_sp": 0.7, "lr": 1e-3}  # lr: not a network metric
    details = {
        "val_mean_dice_sp": torch.tensor([[0.8, float("nan")], [0.6, 0.5], [0.7, 1.0]]),
        "val_mean_dice_teacher": torch.tensor([[1.0, 0.8, 0.1]]),  # 3 columns: not these 2 classes, no columns
    }
    teacher, sp = table.rows(metrics, details)
    assert teacher == {"network": "teacher", "mean_dice": 0.9}
    assert sp["mean_dice"] == 0.7 and sp["params"] == 9
    assert sp["mean_dice:liver"] == pytest.approx(0.7) and sp["mean_dice:tumour"] == pytest.approx(0.75)
    assert not any(math.isnan(v) for v in sp.values() if isinstance(v, float))
    assert table.absent_note(details) == (
        "Images without a class in their label map (tumour in 1 of 3) have no score for it and are left out of its "
        "mean: a network's false positives on them are not counted."
    )
    assert table.absent_note({"val_mean_dice_sp": torch.ones(3, 2)}) == ""


def test_markdown_table_columns_in_first_seen_order():
    md = markdown_table([{"network": "sp", "mean_dice": 0.5}, {"network": "sf", "params": 3}])
    assert md.splitlines() == [
        "| network | mean_dice | params |",
        "|---|---|---|",
        "| sp | 0.5000 |  |",
        "| sf |  | 3 |",
    ]


def test_class_columns_of_metrics_saver_files_get_the_class_names(tmp_path):
    (tmp_path / "val_mean_dice_sp_raw.csv").write_text("filename;class0;class1;mean\na.nii;0.5;0.7;0.6\n")
    (tmp_path / "val_mean_dice_sp_summary.csv").write_text("class;mean\nclass0;0.5\nclass1;0.7\nmean;0.6\n")
    (tmp_path / "metrics.csv").write_text("val_mean_dice_sp;0.6\n")  # not a per-class file: left as it is
    NameClassColumns(str(tmp_path), ["liver", "tumour"], delimiter=";")(None)
    assert (tmp_path / "val_mean_dice_sp_raw.csv").read_text() == "filename;liver;tumour;mean\na.nii;0.5;0.7;0.6\n"
    summary = (tmp_path / "val_mean_dice_sp_summary.csv").read_text().splitlines()
    assert summary == ["class;mean", "liver;0.5", "tumour;0.7", "mean;0.6"]
    assert (tmp_path / "metrics.csv").read_text() == "val_mean_dice_sp;0.6\n"


def test_metric_names_are_built_and_read_by_one_rule():
    from medkd.training.evaluators import classification_metrics, metric_name, segmentation_metrics, split_metric_name

    built = [*segmentation_metrics(["teacher", "s_p"]), *classification_metrics(["sf"])]
    assert built == ["val_mean_dice_teacher", "val_mean_dice_s_p", "val_auc_sf", "val_acc_sf", "val_bacc_sf"]
    assert [split_metric_name(n) for n in built] == [
        ("mean_dice", "teacher"), ("mean_dice", "s_p"), ("auc", "sf"), ("acc", "sf"), ("bacc", "sf")
    ]  # fmt: skip
    assert split_metric_name(metric_name("auc", "")) is None and split_metric_name("loss/sp/total") is None


def test_per_case_rows_are_named_by_the_image_and_classes_by_the_foreground():
    from monai.data import MetaTensor

    batch = [{"image": MetaTensor(torch.zeros(1, 2, 2), meta={"filename_or_obj": f"{name}.nii"})} for name in "ab"]
    assert [m["filename_or_obj"] for m in image_meta(batch)] == ["a.nii", "b.nii"]
    assert foreground(["background", "liver", "tumour"]) == ["liver", "tumour"]


def test_comparison_summary_plot_and_files_without_running_anything(tmp_path, capsys):
    from medkd.tools.report import summarize, write_comparison

    rows = [{"preset": "-", "seed": "-", "network": "teacher", "auc": 0.9, "params": 10, "ms_per_image": 2.0}]
    rows += [{"preset": "kd", "seed": s, "network": "sp", "auc": v, "params": 3, "ms_per_image": 1.0}
             for s, v in ((0, 0.6), (1, 0.8))]  # fmt: skip
    assert summarize(rows).splitlines()[2:] == [
        "| teacher | teacher | 1 | 0.9000 | 10 | 2.00 |",  # one seed: no spread shown
        "| kd | sp | 2 | 0.7000 ± 0.1414 | 3 | 1.00 |",
    ]
    history = tmp_path / "history.csv"
    history.write_text("epoch,val_auc_sp\n1,0.5\n2,0.7\n")
    previous = locale.setlocale(locale.LC_ALL)
    locale.setlocale(locale.LC_ALL, "C")  # ASCII by default, as after reading DICOM through ITK
    try:
        table = write_comparison(rows, {("kd", 0): history}, tmp_path)  # "±" written in utf-8 all the same
    finally:
        locale.setlocale(locale.LC_ALL, previous)
    assert (tmp_path / "results.md").read_text(encoding="utf-8") == table + "\n" and table in capsys.readouterr().out
    assert (tmp_path / "results.csv").read_text().splitlines()[0] == "preset,seed,network,auc,params,ms_per_image"
    assert (tmp_path / "comparison.png").read_bytes().startswith(b"\x89PNG")
    assert "over the students trained alone" not in table  # no student-alone runs to pair with


def test_gains_are_paired_by_network_and_seed_with_the_gap_recovered_from_the_teacher():
    from medkd.tools.gains import method_gains
    from medkd.tools.report import paired_gains

    def row(preset, seed, network, auc, acc=None):
        return {"preset": preset, "seed": seed, "network": network, "auc": auc, "acc": acc, "auc:tumour": 0.1}

    rows = [{"preset": "-", "seed": "-", "network": "teacher", "auc": 0.99}]
    rows += [row("student", s, n, auc, 0.5) for s, n, auc in ((0, "sp", 0.80), (1, "sp", 0.70), (0, "sf", 0.75))]
    rows += [
        row("kd", s, n, auc, 0.6) for s, n, auc in ((0, "sp", 0.83), (1, "sp", 0.69), (0, "sf", 0.80), (2, "sp", 1))
    ]
    rows.append(row("dml", 3, "sp", 0.9))  # no student-alone run of seed 3: left out
    gains = method_gains(rows, ["auc", "acc"], {}, "student")
    lines = paired_gains(gains).splitlines()
    assert lines[2:6] == [
        "| method | network | seeds | gain | 95% CI | seeds won | gap recovered |",
        "|---|---|---|---|---|---|---|",
        "| kd | sp | 2 | +0.0100 ± 0.0283 | – | 1/2 | 4% |",  # 0.01 of the teacher's 0.99 - 0.75
        "| kd | sf | 1 | +0.0500 | – | 1/1 | 21% |",  # 0.05 / (0.99 - 0.75)
    ]
    assert lines[0].startswith("Gain in auc over the students trained alone")
    assert "| kd | sp | 2 | +0.1000 ± 0.0000 | – | 2/2 | – |" in lines  # acc: no teacher score, no gap
    assert any(line.startswith("- gap recovered: (method − alone) / (teacher − alone)") for line in lines)
    assert method_gains(rows[4:], ["auc"], {}, "student") == []  # no student-alone runs left


def test_auc_is_macro_over_the_classes_present():
    from monai.metrics import ROCAUCMetric

    from medkd.training.evaluators import PresentClassesROCAUC

    scores = torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.3, 0.6], [0.4, 0.4, 0.2], [0.3, 0.1, 0.6]])
    labels = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 1, 0]), 3)
    ours, monai = PresentClassesROCAUC(), ROCAUCMetric(average="macro")
    for metric in (ours, monai):
        metric(scores, labels)
    assert ours.aggregate() == pytest.approx(float(monai.aggregate()))  # every class present: MONAI's macro AUC
    no_class_2 = PresentClassesROCAUC()
    no_class_2(scores[[0, 1, 3]], labels[[0, 1, 3]])
    per_class = ROCAUCMetric(average="none")
    per_class(scores[[0, 1, 3]], labels[[0, 1, 3]])
    first_two = [float(v) for v in per_class.aggregate()][:2]
    assert no_class_2.aggregate() == pytest.approx(sum(first_two) / 2)  # MONAI's macro: NaN
    one_class = PresentClassesROCAUC()
    one_class(scores[[1, 3]], labels[[1, 3]])
    assert math.isnan(one_class.aggregate())


def test_balanced_accuracy_does_not_reward_the_majority_class():
    from ignite.metrics import Accuracy

    from medkd.training.evaluators import BalancedAccuracy

    labels = torch.tensor([0] * 9 + [1])  # 90 % / 10 %
    majority = torch.tensor([[0.9, 0.1]]).repeat(10, 1)  # always class 0
    for scores, balanced, accuracy in ((majority, 0.5, 0.9), (torch.eye(2)[labels], 1.0, 1.0)):
        metric, plain = BalancedAccuracy(), Accuracy()
        for half in (slice(0, 5), slice(5, 10)):  # two batches
            metric.update((scores[half], labels[half]))
            plain.update((scores[half], labels[half]))
        assert metric.compute() == pytest.approx(balanced) and plain.compute() == pytest.approx(accuracy)
    three = BalancedAccuracy()
    three.update((torch.eye(3)[[0, 0, 1, 2]], torch.tensor([0, 1, 1, 1])))  # class 2 absent: left out
    assert three.compute() == pytest.approx((1.0 + 1 / 3) / 2)
    three.reset()
    assert math.isnan(three.compute())
