"""Gains you can trust: the paired bootstrap interval over test images and seeds, the scorers of each metric from
the saved per-image scores, the gap recovered, and the gain tables of results.md."""

import numpy as np
import pytest
import torch

from medkd.tools.gains import (
    RESAMPLES,
    bootstrap_interval,
    classification_scorer,
    gap_recovered,
    image_scores,
    mean_scorer,
)
from medkd.tools.report import write_comparison
from medkd.training.evaluators import BalancedAccuracy, PresentClassesROCAUC


def _pairs(method, alone):
    """One (method, alone) pair of scorers per seed from per-image scores ``(seeds, images)``."""
    return [(mean_scorer(m), mean_scorer(a)) for m, a in zip(method, alone, strict=True)]


def test_a_clear_gain_has_an_interval_above_zero_and_reruns_give_the_same_interval():
    rng = np.random.default_rng(1)
    alone = rng.uniform(0.5, 0.9, size=(3, 40))
    method = alone + 0.05 + rng.normal(0.0, 0.01, size=alone.shape)
    low, high = bootstrap_interval(_pairs(method, alone), 40)
    assert 0.0 < low < 0.05 < high < 0.06
    assert bootstrap_interval(_pairs(method, alone), 40) == (low, high)


def test_identical_scores_have_an_interval_of_width_zero_at_zero():
    alone = np.random.default_rng(2).uniform(0.0, 1.0, size=(2, 30))
    assert bootstrap_interval(_pairs(alone, alone.copy()), 30) == (0.0, 0.0)


def test_pairing_by_image_removes_what_an_image_does_to_both_methods():
    rng = np.random.default_rng(3)
    alone = rng.uniform(0.0, 1.0, size=(1, 25))  # images from easy to hard
    method = alone + 0.01  # the same small gain on every image
    low, high = bootstrap_interval(_pairs(method, alone), 25)
    assert low == pytest.approx(0.01) and high == pytest.approx(0.01)  # paired: the gain alone
    draws = np.random.default_rng(0)  # unpaired: each method's images drawn on their own
    unpaired = [
        method[0, draws.integers(0, 25, 25)].mean() - alone[0, draws.integers(0, 25, 25)].mean()
        for _ in range(RESAMPLES)
    ]
    wide = np.percentile(unpaired, [2.5, 97.5])
    assert wide[0] < 0.0 < wide[1] and wide[1] - wide[0] > 0.2  # the spread of the images hides the gain


def test_nan_images_are_left_out_of_a_mean_score_as_in_the_metric():
    score = mean_scorer([0.5, float("nan"), 1.0])
    assert score(np.array([[1.0, 1.0, 1.0], [0.0, 3.0, 0.0], [2.0, 1.0, 0.0]])) == pytest.approx([0.75, 0.0, 0.5])


def test_classification_scorers_on_all_images_give_the_evaluations_metrics():
    rng = np.random.default_rng(4)
    probabilities = rng.dirichlet(np.ones(3), size=30).round(1)  # rounded: ties in the ranking
    labels = np.array([0] * 14 + [1] * 12 + [2] * 4)
    everything = np.ones((1, 30))
    auc = PresentClassesROCAUC()
    auc(torch.as_tensor(probabilities), torch.nn.functional.one_hot(torch.as_tensor(labels), 3))
    balanced = BalancedAccuracy()
    balanced.update((torch.as_tensor(probabilities), torch.as_tensor(labels)))
    accuracy = (probabilities.argmax(axis=1) == labels).mean()
    for metric, expected in (("auc", auc.aggregate()), ("bacc", balanced.compute()), ("acc", accuracy)):
        assert classification_scorer(metric, probabilities, labels)(everything)[0] == pytest.approx(expected), metric


def test_per_image_scores_are_read_from_the_per_case_files_and_the_probabilities(tmp_path):
    (tmp_path / "val_mean_dice_sp_raw.csv").write_text("filename,liver,mean\na.nii,0.5,0.5\nb.nii,0.7,0.7\n")
    images, score = image_scores(tmp_path, "mean_dice", "sp", ["sp"])
    assert images == ["a.nii", "b.nii"] and score(np.ones((1, 2)))[0] == pytest.approx(0.6)
    (tmp_path / "probabilities.csv").write_text(
        "image,label,sp_big_a,sp_big_b,sp_a,sp_b\nx.png,0,0.9,0.1,0.2,0.8\ny.png,1,0.3,0.7,0.6,0.4\n"
    )
    images, score = image_scores(tmp_path, "acc", "sp", ["sp_big", "sp"])  # not sp_big's columns
    assert images == ["x.png", "y.png"] and score(np.ones((1, 2)))[0] == 0.0
    assert image_scores(tmp_path, "acc", "sp_big", ["sp_big", "sp"])[1](np.ones((1, 2)))[0] == 1.0
    assert image_scores(tmp_path, "mean_dice", "sf", ["sf"]) is None  # not saved: no interval


def test_gap_recovered_is_the_share_of_the_teacher_student_gap_closed():
    assert gap_recovered(0.85, 0.80, 0.90) == pytest.approx(0.5)
    assert gap_recovered(0.78, 0.80, 0.90) == pytest.approx(-0.2)  # worse than alone: a negative share
    assert gap_recovered(0.85, 0.80, 0.80) is None and gap_recovered(0.85, 0.80, 0.70) is None  # no gap


def test_results_md_has_a_gain_table_per_metric_with_the_interval_and_not_shown_gains(tmp_path):
    rng = np.random.default_rng(5)
    alone = rng.uniform(0.3, 0.8, size=(2, 20))
    scores = {"student": {"sp": alone[0], "sf": alone[1]}, "kd": {"sp": alone[0] + 0.05, "sf": alone[1]}}
    rows, evals = [{"preset": "-", "seed": "-", "network": "teacher", "mean_dice": 0.9}], {}
    for preset, networks in scores.items():
        evals[(preset, 0)] = folder = tmp_path / preset / "seed0" / "eval"
        folder.mkdir(parents=True)
        for network, values in networks.items():
            lines = [f"img{i}.nii,{float(v)!r},{float(v)!r}" for i, v in enumerate(values)]
            (folder / f"val_mean_dice_{network}_raw.csv").write_text("\n".join(["filename,a,mean", *lines]) + "\n")
            rows.append({"preset": preset, "seed": 0, "network": network, "mean_dice": float(values.mean())})
    table = write_comparison(rows, {}, tmp_path, evals)
    assert "| method | network | seeds | gain | 95% CI | seeds won | gap recovered |" in table
    sp_gap = 0.05 / (0.9 - alone[0].mean())
    assert f"| kd | sp | 1 | +0.0500 | [+0.0500, +0.0500] | 1/1 | {sp_gap:.0%} |" in table
    assert "| kd | sf | 1 | +0.0000 (n.s.) | [+0.0000, +0.0000] | 0/1 | 0% |" in table
    assert "- (n.s.): not shown, the interval contains 0." in table
    assert (tmp_path / "comparison.png").read_bytes().startswith(b"\x89PNG")
