"""Feature capture by module name and the route graph: presets, validation and clear errors."""

import logging

import pytest
import torch
from conftest import tiny_unet
from monai.networks.nets import DenseNet121

from medkd.errors import ConfigError
from medkd.knowledge.features import FeatureExtractor, default_feature_layer
from medkd.knowledge.routes import PRESETS, KnowledgeRoutes, Route, parse_routes, preset_routes


def test_extractor_captures_named_module_outputs():
    net = tiny_unet()
    layer = default_feature_layer(net)
    assert layer == "model.1.submodule.1.submodule"
    fx = FeatureExtractor(net, [layer, "model.0"])
    net(torch.zeros(2, 1, 32, 32))
    feats = fx.pop()
    assert feats[layer].shape == (2, 16, 8, 8)
    assert feats["model.0"].shape == (2, 4, 16, 16)
    assert fx.features == {}
    fx.remove()
    net(torch.zeros(1, 1, 32, 32))
    assert fx.features == {}


def test_extractor_unknown_layer_lists_valid_names():
    with pytest.raises(ConfigError, match=r"no module named 'model\.9'.*Valid names: model, model\.0"):
        FeatureExtractor(tiny_unet(), ["model.9"], network_name="sp")


def test_default_layer_for_classifiers_and_unknown():
    assert default_feature_layer(DenseNet121(spatial_dims=2, in_channels=1, out_channels=2)) == "features"
    with pytest.raises(ValueError, match="feature_layers"):
        default_feature_layer(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_build_the_documented_graphs(preset):
    routes = preset_routes(preset, ["sp", "sf"], kd_weight=0.5, hint_weight=2.0)
    edges = {(r.source, r.target, r.kind) for r in routes}
    expected = {
        "student": set(),
        "kd": {("teacher", "sp", "prediction"), ("teacher", "sf", "prediction")},
        "fitnets": {("teacher", "sp", "feature"), ("teacher", "sf", "feature")},
        "dml": {("sp", "sf", "prediction"), ("sf", "sp", "prediction")},
        "diversified": {
            ("teacher", "sp", "prediction"),
            ("teacher", "sf", "feature"),
            ("sp", "sf", "prediction"),
            ("sf", "sp", "prediction"),
            ("sp", "sf", "feature"),
            ("sf", "sp", "feature"),
        },
        "cwd": {("teacher", "sp", "channel"), ("teacher", "sf", "channel")},
        "dist": {("teacher", "sp", "dist"), ("teacher", "sf", "dist")},
        "diversified_cwd": {
            ("teacher", "sp", "channel"),
            ("teacher", "sf", "channel"),
            ("sp", "sf", "prediction"),
            ("sf", "sp", "prediction"),
        },
    }
    expected["kd_dml"] = expected["kd"] | expected["dml"]
    assert edges == expected[preset]
    for r in routes:
        if r.source == "teacher":
            assert r.weight == (0.5 if r.kind_class.role(r.options) == "prediction" else 2.0)


def test_parse_routes_from_json_dicts_and_errors():
    routes = parse_routes([{"source": "teacher", "target": "a", "kind": "prediction", "weight": 2}], ["a"])
    assert routes == [Route("teacher", "a", "prediction", weight=2)]
    with pytest.raises(ValueError, match=r"\['wieght'\] do\(es\) nothing on a prediction route"):
        parse_routes([{"source": "teacher", "target": "a", "kind": "prediction", "wieght": 2}], ["a"])
    with pytest.raises(ValueError, match="unknown routes preset 'kdd'"):
        parse_routes("kdd", ["a"])
    with pytest.raises(ValueError, match="exactly two students"):
        preset_routes("diversified", ["a", "b", "c"])


@pytest.mark.parametrize(
    "route, message",
    [
        (Route("teacher", "sx", "prediction"), "unknown target 'sx'"),
        (Route("tutor", "sp", "prediction"), "unknown source 'tutor'"),
        (Route("sp", "teacher", "prediction"), "targets the teacher"),
        (Route("sp", "sp", "prediction"), "to itself"),
        (Route("teacher", "sp", "feature"), "needs layers"),
    ],
)
def test_route_endpoint_errors_are_clear(route, message):
    with pytest.raises(ValueError, match=message):
        KnowledgeRoutes([route], ["sp", "sf"], feature_layers={}).resolve_layers()


def test_named_weights_apply_to_listed_routes_and_presets():
    weights = {"kd_weight": 0.1, "hint_weight": 2.0, "peer_prediction_weight": 0.5, "peer_feature_weight": 3.0}
    listed = [
        {"source": "teacher", "target": "sp", "kind": "prediction"},
        {"source": "teacher", "target": "sf", "kind": "feature"},
        {"source": "teacher", "target": "sf", "kind": "attention"},
        {"source": "sf", "target": "sp", "kind": "prediction", "temperature": 1.0},
        {"source": "sp", "target": "sf", "kind": "feature", "weight": 7.0},  # its own weight wins
    ]
    routes = parse_routes(listed, ["sp", "sf"], weights=weights, temperature=2.0)
    assert [r.weight for r in routes] == [0.1, 2.0, 2.0, 0.5, 7.0]
    assert routes[0].temperature == 2.0 and routes[3].temperature == 1.0
    preset = parse_routes({"preset": "diversified", "weights": {"kd_weight": 0.3}}, ["sp", "sf"], weights=weights)
    assert {(r.source, r.kind): r.weight for r in preset}[("teacher", "prediction")] == 0.3
    assert {(r.source, r.kind): r.weight for r in preset}[("teacher", "feature")] == 2.0
    with pytest.raises(ConfigError, match=r"unknown route weight\(s\) \['alpha'\]"):
        parse_routes("kd", ["sp"], weights={"alpha": 1.0})
    with pytest.raises(ConfigError, match=r"unknown keys: \['weight'\]"):
        parse_routes({"preset": "kd", "weight": 1.0}, ["sp"])


def test_a_listed_route_that_takes_a_named_weight_of_0_is_said_to_do_nothing(caplog):
    attention = {"source": "sp", "target": "sf", "kind": "attention", "layers": "encoder"}
    with caplog.at_level(logging.WARNING, logger="medkd.knowledge.routes"):
        (route,) = parse_routes([attention], ["sp", "sf"], weights={"peer_feature_weight": 0.0})
    assert route.weight == 0.0
    assert "the route sp → sf (attention) has no weight of its own and takes peer_feature_weight, which is 0" in (
        caplog.text
    )
    caplog.clear()
    parse_routes([{**attention, "weight": 0.5}], ["sp", "sf"], weights={"peer_feature_weight": 0.0})
    assert caplog.text == ""  # its own weight: nothing to say


def test_hint_layers_reach_every_feature_route_without_its_own_layers():
    students = ["sp", "sf"]
    layers = {r.name: r.layers for r in parse_routes("diversified", students, hint_layers="multi")}
    assert layers == {
        "sp/prediction_from_teacher": None,
        "sf/feature_from_teacher": "multi",
        "sp/prediction_from_sf": None,
        "sf/prediction_from_sp": None,
        "sp/feature_from_sf": "multi",
        "sf/feature_from_sp": "multi",
    }
    assert [r.layers for r in parse_routes({"preset": "fitnets", "hint_layers": "decoder"}, students)] == [
        "decoder",
        "decoder",
    ]
    listed = [
        {"source": "teacher", "target": "sf", "kind": "feature"},
        {"source": "teacher", "target": "sp", "kind": "feature", "layers": "encoder"},  # its own wins
        {"source": "teacher", "target": "sp", "kind": "attention"},  # not a hint: keeps its default
    ]
    assert [r.layers for r in parse_routes(listed, students, hint_layers="multi")] == ["multi", "encoder", None]
    assert all(r.layers is None for r in parse_routes("diversified", students))  # default: the bottleneck
