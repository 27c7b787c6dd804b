"""Learning styles beyond the paper's two: hints at several depths, affinity and class-region kinds, per-route
warm-up and class weights; each from bundle JSON, checked, on tiny 2D and 3D U-Nets."""

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from bundle_utils import BUNDLES
from conftest import tiny_batches, tiny_batches3d, tiny_trainer, tiny_unet, tiny_unet3d
from ignite.engine import Events
from monai.networks.nets import DenseNet

from medkd.bundles import stage_config
from medkd.errors import ConfigError
from medkd.knowledge.losses import (
    AffinityDistillationLoss,
    FeatureDistillationLoss,
    RegionFeatureLoss,
    RegionPredictionLoss,
    affinity_matrix,
)
from medkd.knowledge.routes import KnowledgeRoutes, Route, parse_routes
from medkd.training.engines import DistillationTrainer, iteration_losses

STUDENTS = ("sp", "sf")


def make_trainer(routes, dims: int = 2, max_epochs: int = 1, n: int = 2, **kwargs) -> DistillationTrainer:
    """Tiny students ``sp`` and ``sf`` (4, 8, 8 channels) and teacher (8, 16, 32) in ``dims`` D, along ``routes``."""
    batches = tiny_batches(n=n, batch_size=2) if dims == 2 else tiny_batches3d(n=n, batch_size=2)
    return tiny_trainer(routes, batches, tiny_unet if dims == 2 else tiny_unet3d, max_epochs=max_epochs, **kwargs)


def step(trainer: DistillationTrainer, batch: dict):
    """One forward of every network on ``batch`` (students in train mode): logits, hooked features, labels."""
    logits = {name: net(batch["image"]) for name, net in trainer.networks.items()}
    features = {name: trainer.routes.pop_features(name) for name in trainer.networks}
    return logits, features, batch["label"]


UNET2 = ["model.0", "model.1.submodule.1.submodule", "model.1.submodule"]  # tiny U-Net: /2, bottleneck /4, /2


# ------------------------------------------------------------------------------------------ several depths


@pytest.mark.parametrize("dims", [2, 3])
def test_a_feature_route_reads_several_depths_one_adapter_each_and_averages_the_pairs(dims):
    trainer = make_trainer([{"source": "teacher", "target": "sf", "kind": "feature", "layers": "multi"}], dims=dims)
    kind = trainer.routes.kind_of(trainer.routes.routes[0])
    assert kind.pairs == [(name, name) for name in UNET2]
    ones = (1,) * dims
    assert [tuple(p.shape) for p in trainer.routes.parameters_of("sf")] == [(8, 4, *ones), (32, 8, *ones),
                                                                            (8, 4, *ones)]  # fmt: skip
    assert trainer.routes.layers_of("teacher") == UNET2 and trainer.routes.layers_of("sp") == []
    batch = (tiny_batches(n=1, batch_size=2) if dims == 2 else tiny_batches3d(n=1))[0]
    logits, features, labels = step(trainer, batch)
    term = trainer.routes(logits, features, labels)["sf/feature_from_teacher"]
    pairs = [FeatureDistillationLoss(1, 1, dims) for _ in UNET2]
    for pair, loss in zip(pairs, kind.losses, strict=True):
        pair.adapter = loss.adapter
    each = [loss(features["sf"][name], features["teacher"][name]) for loss, name in zip(pairs, UNET2, strict=True)]
    assert term.ndim == 0 and term.item() == pytest.approx(sum(e.item() for e in each) / 3, rel=1e-6)
    assert min(e.item() for e in each) < term.item() < max(e.item() for e in each)


def test_attention_and_named_depths_need_no_adapter_and_errors_name_the_route():
    trainer = make_trainer([{"source": "teacher", "target": "sp", "kind": "attention", "layers": "encoder"},
                            {"source": "sp", "target": "sf", "kind": "attention", "layers": "decoder"}])  # fmt: skip
    kinds = [trainer.routes.kind_of(r) for r in trainer.routes.routes]
    assert [k.pairs for k in kinds] == [[(UNET2[0], UNET2[0]), (UNET2[1], UNET2[1])], [(UNET2[2], UNET2[2])]]
    assert trainer.routes.parameters_of("sp") == [] and trainer.routes.parameters_of("sf") == []
    with pytest.raises(ConfigError, match=r"the layers of route sp/feature_from_teacher must be .* or one of "
                       r"\['multi', 'encoder', 'decoder', 'last_decoder'\]"):  # fmt: skip
        Route("teacher", "sp", "feature", layers="all")
    graph = KnowledgeRoutes([Route("teacher", "sp", "feature", layers="decoder")], ["sp"])
    classifier = DenseNet(2, 1, 2, init_features=8, growth_rate=4, block_config=(2, 2))
    with pytest.raises(ConfigError, match=r"sp/feature_from_teacher has layers 'decoder', but teacher and sp have "
                       r"no such depths"):  # fmt: skip
        graph.setup({"teacher": classifier, "sp": classifier}, torch.zeros(1, 1, 32, 32))
    with pytest.raises(ConfigError, match="finding the depths of network 'teacher' needs the network and example"):
        KnowledgeRoutes([Route("teacher", "sp", "feature", layers="multi")], ["sp"]).resolve_layers()


# --------------------------------------------------------------------------------------------------- affinity


def test_affinity_is_the_cosine_similarity_of_positions_and_zero_for_alike_maps():
    x = torch.tensor([[[[1.0, 1.0]], [[0.0, 1.0]]]])  # (1, C=2, 1, 2): positions (1, 0) and (1, 1)
    c = 1 / math.sqrt(2)
    assert affinity_matrix(x).flatten().tolist() == pytest.approx([1.0, c, c, 1.0])
    loss = AffinityDistillationLoss(grid=4)
    src, dst = torch.randn(2, 5, 16, 16), torch.randn(2, 3, 8, 8, requires_grad=True)
    value = loss(dst, src)
    assert value.ndim == 0 and value.item() > 0
    value.backward()
    assert dst.grad is not None and dst.grad.abs().sum() > 0
    assert loss(2 * src, src).item() == pytest.approx(0.0, abs=1e-6)  # it compares structure, not scale
    expected = F.mse_loss(
        affinity_matrix(F.adaptive_avg_pool2d(dst, 4)), affinity_matrix(F.adaptive_avg_pool2d(src, 4))
    )
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    volume = torch.randn(1, 4, 6, 8, 8)
    assert AffinityDistillationLoss(grid=4)(volume, volume).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("grid", [0, 2.5, True, "8", None])
def test_affinity_grid_is_checked(grid):
    with pytest.raises(ConfigError, match=r"the grid of route sp/affinity_from_teacher must be a whole number >= 1"):
        parse_routes([{"source": "teacher", "target": "sp", "kind": "affinity", "grid": grid}], ["sp"])


def test_affinity_grid_too_large_for_the_dims_is_named():
    trainer = make_trainer([{"source": "teacher", "target": "sp", "kind": "affinity", "grid": 17}], dims=3, n=1)
    with pytest.raises(ConfigError, match=r"grid 17: 4913 positions in 3D.*a grid of at most 16"):
        trainer.run()


# ----------------------------------------------------------------------------------------------------- region


def test_region_losses_by_hand_and_zero_for_equal_signals():
    # (B=1, C=2, H=1, W=3); regions: class 0 = pixels 0 and 1, class 1 = pixel 2
    dst = torch.tensor([[[[0.0, 1.0, -1.0]], [[0.0, 0.0, 1.0]]]])
    src = torch.tensor([[[[2.0, 0.0, 0.0]], [[0.0, 0.0, 2.0]]]])
    regions = torch.tensor([[[[1.0, 1.0, 0.0]], [[0.0, 0.0, 1.0]]]])
    p_dst, p_src = dst.softmax(1)[0, :, 0].T, src.softmax(1)[0, :, 0].T  # (pixels, classes)
    means_dst, means_src = [p_dst[:2].mean(0), p_dst[2]], [p_src[:2].mean(0), p_src[2]]
    kl = [(s * (s / d).log()).sum().item() for s, d in zip(means_src, means_dst, strict=True)]
    assert RegionPredictionLoss(1.0)(dst, src, regions).item() == pytest.approx(sum(kl) / 2, rel=1e-5)
    assert RegionPredictionLoss(2.0)(src, src, regions).item() == pytest.approx(0.0, abs=1e-6)
    feats_dst, feats_src = torch.randn(2, 6, 8, 8), torch.randn(2, 3, 4, 4)
    seg = torch.randn(2, 3, 16, 16).softmax(1)
    assert RegionFeatureLoss()(feats_dst, feats_src, seg).item() > 0
    assert RegionFeatureLoss()(feats_src * 3, feats_src, seg).item() == pytest.approx(0.0, abs=1e-6)
    absent = seg.clone()
    absent[:, 2] = 0  # a class absent from the batch counts in no pair
    one_hot = torch.zeros(1, 2, 1, 3)
    one_hot[:, 0] = 1  # only class 0 present: no pair of classes to compare
    assert RegionFeatureLoss()(torch.randn(1, 4, 1, 3), torch.randn(1, 4, 1, 3), one_hot).item() == 0.0
    assert torch.isfinite(RegionFeatureLoss()(feats_dst, feats_src, absent))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"signal": "logits"}, r"has signal 'logits'; use one of \['predictions', 'features'\]"),
        ({"regions": "teacher"}, r"has regions 'teacher'; use one of \['source', 'labels'\]"),
        ({"temperature": 0}, "the temperature of route sp/region_from_teacher must be a finite number > 0"),
        ({"layers": "multi"}, "reads no layers with signal 'predictions'; remove 'layers'"),
        ({"signal": "features", "layers": [["a"]]}, r"the layers of route sp/region_from_teacher must be"),
    ],
)
def test_region_options_are_checked(options, message):
    with pytest.raises(ConfigError, match=message):
        parse_routes([{"source": "teacher", "target": "sp", "kind": "region", **options}], ["sp"])


def test_region_from_labels_needs_labels_and_segmentation_logits():
    graph = KnowledgeRoutes([Route("teacher", "sp", "region", options={"regions": "labels"})], ["sp"])
    logits = {"teacher": torch.randn(1, 2, 4, 4), "sp": torch.randn(1, 2, 4, 4)}
    with pytest.raises(ConfigError, match=r"route sp/region_from_teacher: regions 'labels' needs the batch labels"):
        graph(logits, {})
    labels = torch.zeros(1, 1, 4, 4)
    labels[..., :2] = 1
    assert graph(logits, {}, labels)["sp/region_from_teacher"].item() > 0
    with pytest.raises(ConfigError, match="needs segmentation logits"):
        graph({"teacher": torch.randn(2, 2), "sp": torch.randn(2, 2)}, {}, torch.tensor([0, 1]))


# ------------------------------------------------------------------------------------------- class weights


def _pixel_kl(dst: torch.Tensor, src: torch.Tensor, tau: float) -> torch.Tensor:
    """``τ² KL`` of every pixel, ``(B, *spatial)``."""
    return tau * tau * F.kl_div(F.log_softmax(dst / tau, 1), F.log_softmax(src / tau, 1), reduction="none",
                                log_target=True).sum(1)  # fmt: skip


def test_class_weights_weight_the_pixelwise_kl_by_label():
    torch.manual_seed(0)
    logits = {"sf": torch.randn(1, 2, 2, 2), "sp": torch.randn(1, 2, 2, 2)}
    labels = torch.tensor([[[[0, 0], [0, 1]]]])  # three background pixels, one of the small class
    kl = _pixel_kl(logits["sp"], logits["sf"], 2.0).flatten()

    def term(class_weights, targets=labels):
        route = Route("sf", "sp", "prediction", temperature=2.0, options={"class_weights": class_weights})
        return KnowledgeRoutes([route], STUDENTS)(logits, {}, targets)["sp/prediction_from_sf"].item()

    plain = term(None)
    assert plain == pytest.approx(kl.mean().item(), rel=1e-5)
    assert term([3.0, 3.0]) == pytest.approx(plain, rel=1e-5)  # uniform weights: the plain mean
    assert term([0.0, 1.0]) == pytest.approx(kl[3].item(), rel=1e-5)  # the small class only
    by_class = (kl[:3].mean() + kl[3]) / 2  # the mean over the classes of each class's mean KL
    assert term("inverse_frequency") == pytest.approx(by_class.item(), rel=1e-5)
    assert term("inverse_frequency") != pytest.approx(plain, rel=1e-3)
    assert term([1.0, 2.0]) == pytest.approx(((kl[:3].sum() + 2 * kl[3]) / 5).item(), rel=1e-5)
    ignored = torch.tensor([[[[0, 255], [0, 1]]]])  # a label outside the classes weighs 0
    assert term([1.0, 1.0], ignored) == pytest.approx(kl[[0, 2, 3]].mean().item(), rel=1e-5)
    one_hot = torch.cat([labels == 0, labels == 1], dim=1).float()
    assert term("inverse_frequency", one_hot) == pytest.approx(by_class.item(), rel=1e-5)
    with pytest.raises(ConfigError, match=r"sp/prediction_from_sf has class_weights for 3 classes, but the networks "
                       r"predict 2"):  # fmt: skip
        term([1.0, 1.0, 1.0])
    with pytest.raises(ConfigError, match="class_weights needs the batch labels"):
        term("inverse_frequency", None)


@pytest.mark.parametrize("value", ["inverse", [], [-1.0, 1.0], [0, 0], [1, "a"], 3, [float("nan"), 1]])
def test_class_weights_are_checked(value):
    with pytest.raises(ConfigError, match=r"class_weights of route sp/prediction_from_teacher"):
        parse_routes([{"source": "teacher", "target": "sp", "kind": "prediction", "class_weights": value}], ["sp"])


# ------------------------------------------------------------------------------------------------- warm-up


def test_warmup_ramps_each_weight_linearly_from_zero():
    route = Route("teacher", "sp", "prediction", weight=2.0, warmup_epochs=4)
    assert [route.weight_at(epoch) for epoch in range(1, 7)] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]
    assert route.weight_at(None) == 2.0
    assert [Route("teacher", "sp", "feature", weight=2.0).weight_at(e) for e in (1, 2)] == [2.0, 2.0]
    assert Route("teacher", "sp", "feature", warmup_epochs=1).weight_at(2) == 1.0
    assert route.to_dict()["warmup_epochs"] == 4 and Route.from_dict(route.to_dict()) == route
    assert "warmup_epochs" not in Route("teacher", "sp", "prediction").to_dict()  # fingerprints of before unchanged


@pytest.mark.parametrize("value", [-1, 1.5, True, "3", None])
def test_warmup_epochs_are_checked(value):
    with pytest.raises(ConfigError, match=r"the warmup_epochs of route sp/\w+_from_teacher must be a whole number"):
        parse_routes([{"source": "teacher", "target": "sp", "kind": "prediction", "warmup_epochs": value}], ["sp"])
    with pytest.raises(ConfigError, match=r"warmup_epochs must be a whole number"):
        parse_routes("kd", ["sp"], warmup_epochs=value if value is not None else -1)


def test_a_bundle_level_warmup_reaches_presets_and_listed_routes():
    assert {r.warmup_epochs for r in parse_routes("diversified", STUDENTS, warmup_epochs=3)} == {3}
    assert {r.warmup_epochs for r in parse_routes({"preset": "kd", "warmup_epochs": 2}, STUDENTS, warmup_epochs=3)} == {
        2
    }
    listed = [{"source": "teacher", "target": "sp", "kind": "region"},
              {"source": "teacher", "target": "sf", "kind": "feature", "warmup_epochs": 0}]  # fmt: skip
    assert [r.warmup_epochs for r in parse_routes(listed, STUDENTS, warmup_epochs=5)] == [5, 0]
    assert {r.warmup_epochs for r in parse_routes("diversified", STUDENTS)} == {0}
    config = stage_config(BUNDLES / "segmentation_2d", "train", {"class_names": ["bg", "a"], "warmup_epochs": 3})
    assert {r.warmup_epochs for r in config.get_parsed_content("route_graph")} == {3}


def test_the_trainer_weighs_each_epoch_by_its_warmup():
    trainer = make_trainer([{"source": "teacher", "target": "sp", "kind": "prediction", "weight": 2.0,
                             "warmup_epochs": 2}], max_epochs=3, n=1)  # fmt: skip
    seen = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(iteration_losses(e.state.output)))
    trainer.run()
    for epoch, terms in enumerate(seen, start=1):
        factor = min(1.0, (epoch - 1) / 2)
        expected = terms["sp/sup"] + 2.0 * factor * terms["sp/prediction_from_teacher"]
        assert float(terms["sp/total"]) == pytest.approx(float(expected), rel=1e-6), epoch
        assert float(terms["sp/prediction_from_teacher"]) > 0
    assert float(seen[0]["sp/total"]) == float(seen[0]["sp/sup"])  # weight 0 in the first epoch


def test_a_route_weighted_zero_is_not_computed_and_changes_nothing():
    """δ = 0 (the bundles' default): the peer feature routes are neither computed nor logged, and the students
    train exactly as without those routes."""
    zero = parse_routes("diversified", STUDENTS, weights={"peer_feature_weight": 0.0})
    without = [route for route in zero if route.weight != 0]
    assert len(without) == len(zero) - 2
    runs = {}
    for name, routes in (("zero", zero), ("without", without)):
        runs[name] = make_trainer(routes, max_epochs=2)
        runs[name].run()
    terms = iteration_losses(runs["zero"].state.output)
    assert set(terms) == set(iteration_losses(runs["without"].state.output))
    assert "sp/feature_from_sf" not in terms and "sf/feature_from_sp" not in terms
    assert [r.name for r in runs["zero"].routes.active] == [r.name for r in without]
    for student in STUDENTS:
        trained, reference = (runs[name].students[student].state_dict() for name in ("zero", "without"))
        for key, value in reference.items():
            assert torch.equal(trained[key], value), f"{student} {key}"


# ------------------------------------------------------------------ every new kind: gradients and a short run

NEW_ROUTES = {
    "feature_multi": {"kind": "feature", "layers": "multi"},
    "attention_decoder": {"kind": "attention", "layers": "decoder"},
    "affinity": {"kind": "affinity", "layers": "multi", "grid": 4},
    "region_predictions": {"kind": "region"},
    "region_labels": {"kind": "region", "regions": "labels", "temperature": 2.0},
    "region_features": {"kind": "region", "signal": "features", "layers": "multi"},
    "prediction_weighted": {"kind": "prediction", "class_weights": "inverse_frequency"},
}


@pytest.mark.parametrize("route", NEW_ROUTES.values(), ids=NEW_ROUTES.keys())
def test_new_kinds_send_gradients_only_to_their_target_and_its_adapters(route):
    """A peer route sf -> sp, beside a teacher -> sf feature route whose adapters belong to sf."""
    trainer = make_trainer([{"source": "sf", "target": "sp", **route},
                            {"source": "teacher", "target": "sf", "kind": "feature", "layers": "multi"}])  # fmt: skip
    logits, features, labels = step(trainer, tiny_batches(n=1, batch_size=2, seed=3)[0])
    for module in (*trainer.students.values(), trainer.routes):
        module.zero_grad(set_to_none=True)
    name = trainer.routes.routes[0].name
    term = trainer.routes(logits, features, labels)[name]
    assert term.ndim == 0 and math.isfinite(term.item()) and term.item() > 0
    term.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.students["sp"].parameters())
    assert all(p.grad is None for p in trainer.students["sf"].parameters())
    assert all(p.grad is None for p in trainer.routes.parameters_of("sf"))  # sf's adapters: not this route's
    assert all(p.grad is not None for p in trainer.routes.parameters_of("sp"))  # its own adapters learn
    assert all(not p.requires_grad or p.grad is None for p in trainer.teacher.parameters())


@pytest.mark.parametrize("route", NEW_ROUTES.values(), ids=NEW_ROUTES.keys())
def test_new_kinds_are_zero_when_source_and_target_are_alike(route):
    """One network as both source and target: its maps match theirs (same channels, no adapter), terms are zero."""
    network = tiny_unet((8, 16, 32), seed=0).eval()
    graph = KnowledgeRoutes([{"source": "teacher", "target": "sp", **route}], ["sp"])
    graph.setup({"teacher": network, "sp": network}, torch.zeros(1, 1, 32, 32))
    assert graph.parameters_of("sp") == []
    batch = tiny_batches(n=1, batch_size=2)[0]
    output = network(batch["image"])
    logits = {"teacher": output, "sp": output}
    features = {name: graph.pop_features(name) for name in ("teacher", "sp")}
    term = graph(logits, features, batch["label"])[graph.routes[0].name]
    assert term.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("route", NEW_ROUTES.values(), ids=NEW_ROUTES.keys())
def test_a_short_run_with_each_new_kind(route):
    trainer = make_trainer([{"source": "teacher", "target": "sp", "weight": 0.5, **route},
                            {"source": "sp", "target": "sf", **route}])  # fmt: skip
    trainer.run()
    assert trainer.state.iteration == 2
    terms = {k: float(v) for k, v in iteration_losses(trainer.state.output).items()}
    assert all(math.isfinite(v) and v >= 0 for v in terms.values())
    kind = trainer.routes.routes[0].kind_name
    assert terms["sp/total"] == pytest.approx(terms["sp/sup"] + 0.5 * terms[f"sp/{kind}_from_teacher"], rel=1e-5)
    assert terms["sf/total"] == pytest.approx(terms["sf/sup"] + terms[f"sf/{kind}_from_sp"], rel=1e-5)


def test_a_short_3d_run_with_the_new_kinds():
    routes = [{"source": "teacher", "target": "sf", "kind": "feature", "layers": "multi", "warmup_epochs": 1},
              {"source": "teacher", "target": "sp", "kind": "affinity", "layers": "multi"},
              {"source": "sf", "target": "sp", "kind": "region", "signal": "features", "regions": "labels"},
              {"source": "teacher", "target": "sp", "kind": "prediction", "class_weights": [0.2, 1.0]}]  # fmt: skip
    trainer = make_trainer(routes, dims=3)
    trainer.run()
    terms = {k: float(v) for k, v in iteration_losses(trainer.state.output).items()}
    assert len(terms) == 8 and all(math.isfinite(v) and v >= 0 for v in terms.values())
    assert terms["sf/total"] == pytest.approx(terms["sf/sup"], rel=1e-6)  # warm-up: weight 0 in epoch 1
    assert terms["sp/affinity_from_teacher"] > 0 and terms["sp/region_from_sf"] > 0


def test_the_bundle_readme_routes_example_builds_and_runs_on_the_bundle_networks():
    readme = (BUNDLES / "segmentation_2d" / "docs" / "README.md").read_text(encoding="utf-8")
    routes = json.loads(re.search(r"```json\n(\{\"routes\": \[.*?\n\]\})\n```", readme, re.S).group(1))["routes"]
    config = stage_config(BUNDLES / "segmentation_2d", "train", {"class_names": ["bg", "a", "b"], "routes": routes})
    graph = KnowledgeRoutes(config.get_parsed_content("route_graph"), STUDENTS)
    assert {r.kind_name for r in graph.routes} == {"prediction", "feature", "affinity", "region", "attention"}
    nets = {"teacher": config.get_parsed_content("teacher"), **config.get_parsed_content("students")}
    x, labels = torch.randn(2, 1, 32, 32), torch.randint(0, 3, (2, 1, 32, 32))
    graph.setup(nets, x)
    depths = 2 * len(config.get_parsed_content("strides")) - 1  # encoder levels, bottleneck, decoder levels
    assert len(graph.parameters_of("sf")) == depths  # one adapter per depth of the teacher -> sf feature route
    logits = {name: net(x) for name, net in nets.items()}
    features = {name: graph.pop_features(name) for name in nets}
    terms = graph.losses(logits, features, {"sp": torch.tensor(0.0), "sf": torch.tensor(0.0)}, labels, epoch=1)
    assert all(math.isfinite(v.item()) and v.item() >= 0 for v in terms.values())
