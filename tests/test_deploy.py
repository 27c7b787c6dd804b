"""The deployment report (python -m medkd deploy-report): its files and rows, and that its numbers are right."""

from __future__ import annotations

import csv

import pytest
import torch
from bundle_utils import BUNDLES, TINY, native_spacing, run_stage
from monai.inferers import SimpleInferer

from medkd import bundles
from medkd.__main__ import main
from medkd.errors import ConfigError
from medkd.tools import deploy

BUNDLE = "segmentation_2d"
SMALL = {"strides": [2, 2], "teacher_channels": [8, 16, 32]}  # fewer, smaller layers: quicker to trace and export
SETTINGS = {**TINY[BUNDLE], **native_spacing(BUNDLE), **SMALL}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny 2D segmentation bundle: teacher, students (1 epoch each) and their test scores."""
    root = tmp_path_factory.mktemp("trained")
    for stage in ("train_teacher", "train", "evaluate"):
        run_stage(BUNDLE, stage, root, **native_spacing(BUNDLE), **SMALL)
    return root


def test_the_report_has_one_row_per_network_and_runtime_and_a_second_run_sets_the_first_aside(trained, monkeypatch):
    rows = deploy.deploy_report(trained, BUNDLES / BUNDLE, SETTINGS, repeats=1, warmup=0, memory=False)
    folder = trained / bundles.DEPLOY_DIR
    bundle = deploy.load_bundle(trained, BUNDLES / BUNDLE, SETTINGS)
    assert list(bundle.networks) == ["teacher", "sp", "sf", "ensemble"]
    assert [(r["network"], r["runtime"]) for r in rows] == [(n, r) for n in bundle.networks for r in deploy.RUNTIMES]
    for name in ("deploy_report.md", "deploy_report.csv", "metric_vs_latency.png", "teacher.onnx", "ensemble.onnx"):
        assert (folder / name).is_file(), name
    with (folder / bundles.DEPLOY_REPORT_CSV).open(newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows) == 12
    for row in rows:
        assert row["params"] == sum(p.numel() for p in bundle.networks[row["network"]].parameters())
        assert row["gmacs"] > 0 and row["latency_ms"] > 0 and 0 <= row["mean_dice"] <= 1
    params = {r["network"]: r["params"] for r in rows}
    assert params["ensemble"] == params["sp"] + params["sf"]
    # TorchScript and ONNX Runtime give the eager outputs on the test image, and ONNX also at a second size
    assert all(r["max_diff_vs_eager"] < 1e-4 for r in rows), rows
    second = [r["onnx_second_size"] for r in rows if r["runtime"] == "onnxruntime"]
    assert all(" ok, " in s and float(s.rsplit(" ", 1)[1]) < 1e-4 for s in second), second

    monkeypatch.setattr(deploy, "onnx_available", lambda: False)  # a second run, without the deploy extra
    again = deploy.deploy_report(trained, BUNDLES / BUNDLE, SETTINGS, repeats=1, warmup=0, memory=False)
    assert {r["runtime"] for r in again} == {"eager", "torchscript"}
    assert "pip install" in (folder / bundles.DEPLOY_REPORT_MD).read_text()
    (aside,) = trained.glob("deploy.*")
    assert (aside / "teacher.onnx").is_file() and (aside / bundles.DEPLOY_REPORT_CSV).is_file()


def test_macs_of_a_convolution_are_the_hand_count():
    conv = torch.nn.Conv2d(2, 4, kernel_size=3, padding=1)
    # each of the 4 x 8 x 8 outputs sums 2 x 3 x 3 products; the bias adds no multiply
    assert deploy.count_macs(conv, torch.rand(1, 2, 8, 8)) == 4 * 8 * 8 * 2 * 3 * 3
    assert deploy.count_parameters(conv) == 4 * 2 * 3 * 3 + 4


def test_peak_memory_is_the_rss_increase_of_one_inference_in_a_fresh_process(trained, tmp_path):
    conv = torch.nn.Conv2d(1, 16, kernel_size=3, padding=1).eval()
    torch.save(conv, tmp_path / "conv.pt")
    peak = deploy.peak_rss_increase_mb("eager", tmp_path / "conv.pt", torch.rand(1, 1, 512, 512), SimpleInferer())
    assert peak is not None and 16 <= peak < 200  # the 16-channel output alone is 16 MB
    bundle = deploy.load_bundle(trained, BUNDLES / BUNDLE, SETTINGS)  # the bundle's test image and sliding window
    torch.save(bundle.networks["sp"], tmp_path / "sp.pt")
    assert deploy.peak_rss_increase_mb("eager", tmp_path / "sp.pt", bundle.image, bundle.inferer) >= 0


def test_the_command_names_the_missing_configs_and_the_option_that_gives_them(tmp_path):
    with pytest.raises(ConfigError, match="no configs/train.json: .*--bundle"):
        main(["deploy-report", str(tmp_path)])


def test_a_mistyped_setting_stops_the_command_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="patch_sise.*patch_size"):
        main(["deploy-report", str(tmp_path), "--bundle", str(BUNDLES / BUNDLE), "--set", "patch_sise=[32,32]"])
