"""The comparison picture: one colour per method everywhere, honest axes, curves as mean and band over seeds."""

import pytest

from medkd.tools.comparison_plot import ALONE_COLOR, comparison_figure, mean_band, method_colors, plot_comparison
from medkd.tools.gains import Gain


def test_a_method_keeps_its_colour_whatever_else_is_compared():
    every = method_colors(["student", "kd", "dml", "diversified", "cwd"])
    some = method_colors(["diversified", "kd"])
    assert some == {"diversified": every["diversified"], "kd": every["kd"]}
    assert every["student"] == ALONE_COLOR and len(set(every.values())) == len(every)
    other = method_colors(["kd", "my_method", "your_method"])
    assert len(set(other.values())) == 3  # names outside the registry take colours no preset has


def test_mean_band_is_the_mean_and_the_range_over_seeds_per_epoch():
    epochs, mean, low, high = mean_band([{1: 0.2, 2: 0.6}, {1: 0.4, 2: 0.5, 3: 0.9}])
    assert epochs == [1, 2, 3]
    assert mean == pytest.approx([0.3, 0.55, 0.9]) and low == [0.2, 0.5, 0.9] and high == [0.4, 0.6, 0.9]


def _rows():
    rows = [{"preset": "-", "seed": "-", "network": "teacher", "mean_dice": 0.92}]
    for seed, (alone, kd) in enumerate(((0.80, 0.84), (0.82, 0.85), (0.81, 0.86))):
        rows += [{"preset": "student", "seed": seed, "network": "sp", "mean_dice": alone},
                 {"preset": "kd", "seed": seed, "network": "sp", "mean_dice": kd}]  # fmt: skip
    return rows


def _curves(tmp_path):
    curves = {}
    for preset in ("student", "kd"):
        for seed in range(3):
            path = tmp_path / f"{preset}{seed}.csv"
            path.write_text("epoch,val_mean_dice_sp\n2,0.5\n4,0.7\n6,0.8\n")
            curves[(preset, seed)] = path
    return curves


def test_axes_are_honest_and_the_legend_sits_outside_the_panels(tmp_path):
    import matplotlib.pyplot as plt

    gains = [Gain("kd", "sp", "mean_dice", [0.04, 0.03, 0.05], (0.02, 0.06), 0.3)]
    fig = comparison_figure(_rows(), _curves(tmp_path), gains)
    scores, gain_axis, curve = fig.axes
    low, _ = scores.get_ylim()
    assert low > 0 and f"axis cut: starts at {low:.2f}" in scores.get_ylabel()  # a zoomed axis says so
    assert gain_axis.get_ylim()[0] <= 0.0  # every gain positive, and still the axis holds 0
    assert list(curve.get_xticks()) == [2, 4, 6]  # the validated epochs, no fractional ticks
    assert [c.get_facecolor()[:3] for c in curve.collections]  # bands over the three seeds
    assert not any(ax.get_legend() for ax in fig.axes) and len(fig.legends) == 1
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["student", "kd", "sp", "teacher"]
    plt.close(fig)


def test_the_picture_is_written(tmp_path):
    plot_comparison(_rows(), _curves(tmp_path), tmp_path / "out" / "comparison.png")
    assert (tmp_path / "out" / "comparison.png").read_bytes().startswith(b"\x89PNG")
