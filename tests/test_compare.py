"""The method comparison on tiny data, and the README's routes example."""

import csv
import json
import math
import re

import torch
from bundle_utils import BUNDLES, REPO, TINY
from monai.networks.nets import UNet

from medkd.bundles import stage_config
from medkd.compare import _bundle_networks, compare
from medkd.features import FeatureExtractor, default_feature_layer
from medkd.routes import KnowledgeRoutes, parse_routes
from medkd.synthetic import ensure_segmentation_data


def test_timing_input_is_the_bundles_patch_or_image_size():
    classes = ["background", "a", "b"]  # instead of reading a datalist (none in a fresh clone)
    nets, shape = _bundle_networks(BUNDLES / "segmentation_3d", {"patch_size": [24, 24, 16], "class_names": classes})
    assert shape == [1, 1, 24, 24, 16] and {"teacher", "sp", "sf"} <= set(nets)
    overrides = {"image_size": [48, 40], "class_names": classes[:2]}
    _, shape = _bundle_networks(BUNDLES / "classification_2d", overrides)  # no patch_size there
    assert shape == [1, 1, 48, 40]


def test_compare_writes_csv_table_and_plot(tmp_path):
    overrides = {**TINY["segmentation_2d"], "dataset_dir": str(tmp_path / "data")}
    ensure_segmentation_data(str(tmp_path / "data"), spatial_dims=2, size=48, counts=(4, 2, 2))
    rows = compare(
        BUNDLES / "segmentation_2d",
        presets=["student", "diversified"],
        seeds=[0],
        output=tmp_path / "out",
        max_epochs=1,
        teacher_epochs=1,
        overrides=overrides,
    )
    with (tmp_path / "out" / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) == 1 + 2 * 2  # teacher + 2 presets x 2 students
    assert {(r["preset"], r["network"]) for r in table} == {
        ("-", "teacher"), ("student", "sp"), ("student", "sf"), ("diversified", "sp"), ("diversified", "sf")
    }  # fmt: skip
    for r in table:
        for key in ("mean_dice", "params", "ms_per_image"):
            assert math.isfinite(float(r[key])), (key, r)
        assert 0.0 <= float(r["mean_dice"]) <= 1.0
    md = (tmp_path / "out" / "results.md").read_text()
    assert md.startswith("| method | network | seeds | mean_dice | mean_dice:dim_object | mean_dice:bright_object |")
    score = r"\d\.\d{4} ± 0\.0000"
    assert re.search(rf"\| diversified \| sp \| 1 \| {score} \| {score} \| {score} \| \d+ \| \d+\.\d\d \|", md), md
    png = (tmp_path / "out" / "comparison.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    fingerprint = json.loads((tmp_path / "out" / "fingerprint.json").read_text())  # what a rerun must match
    assert fingerprint["dataset_dir"] == str((tmp_path / "data").resolve()) and "seed" not in fingerprint["settings"]


def test_readme_routes_example_builds_on_the_bundle_networks():
    block = re.search(r'```json\n"routes": (\[.*?\n\])\n```', (REPO / "README.md").read_text(), re.S).group(1)
    routes = parse_routes(json.loads(block), ["sp", "sf"])
    config = stage_config(BUNDLES / "segmentation_2d", "train", {"class_names": ["background", "a", "b"]})
    nets = {}
    for name, key in (("teacher", "teacher_def"), ("sp", "student_def"), ("sf", "student_def")):
        d = {k: config.get_parsed_content(f"{key}#{k}") for k in ("channels", "strides", "num_res_units")}
        nets[name] = UNet(2, 1, 3, channels=d["channels"], strides=d["strides"], num_res_units=d["num_res_units"])
    # as the engine does: routes without "layers" use each network's default feature layer
    graph = KnowledgeRoutes(routes, ["sp", "sf"], {n: [default_feature_layer(v)] for n, v in nets.items()})
    feats = {}
    for name, net in nets.items():
        fx = FeatureExtractor(net, graph.layers_of(name), name)
        net(torch.zeros(1, 1, 32, 32))
        feats[name] = fx.pop()
    graph.build(feats, spatial_dims=2)
    assert graph.built and graph.parameters_of("sf")  # teacher 128 ch -> sf 64 ch needs an adapter
