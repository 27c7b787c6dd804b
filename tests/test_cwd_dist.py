"""The channel-wise (CWD) and DIST route kinds, their losses, the "last_decoder" layers and their presets."""

import math

import numpy as np
import pytest
import torch
from conftest import tiny_batches, tiny_batches3d, tiny_trainer, tiny_unet, tiny_unet3d

from medkd.errors import ConfigError
from medkd.knowledge.features import feature_depths, match_depths
from medkd.knowledge.losses import ChannelWiseDistillationLoss, DISTLoss
from medkd.knowledge.routes import KnowledgeRoutes, Route, parse_routes, preset_routes


def numpy_cwd(dst: np.ndarray, src: np.ndarray, tau: float) -> float:
    """CWD as the paper writes it: softmax over the positions of each channel, KL(src ‖ dst), mean over (B, C)."""

    def softmax(x):
        e = np.exp(x.reshape(*x.shape[:2], -1) / tau)
        return e / e.sum(axis=2, keepdims=True)

    p_dst, p_src = softmax(dst), softmax(src)
    return tau**2 * (p_src * np.log(p_src / p_dst)).sum(axis=2).mean()


def numpy_dist(dst: np.ndarray, src: np.ndarray, tau: float, beta: float, gamma: float) -> float:
    """DIST with numpy's correlation coefficients, every pixel a sample."""

    def samples(z):
        e = np.exp(np.moveaxis(z, 1, -1).reshape(-1, z.shape[1]) / tau)
        return e / e.sum(axis=1, keepdims=True)

    p_dst, p_src = samples(dst), samples(src)
    inter = np.mean([1 - np.corrcoef(a, b)[0, 1] for a, b in zip(p_dst, p_src, strict=True)])
    intra = np.mean([1 - np.corrcoef(a, b)[0, 1] for a, b in zip(p_dst.T, p_src.T, strict=True)])
    return tau**2 * (beta * inter + gamma * intra)


def test_channel_wise_loss_by_hand_and_against_numpy():
    # one channel, two positions: teacher softmax (3/4, 1/4), student (1/2, 1/2) at τ = 1
    src, dst = torch.tensor([[[math.log(3.0), 0.0]]]), torch.zeros(1, 1, 2)
    by_hand = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert ChannelWiseDistillationLoss(1.0)(dst, src).item() == pytest.approx(by_hand, abs=1e-6)
    # 1x2x2x2 maps at the default τ = 4: the mean over the two channels, times τ²
    src = torch.tensor([[[[1.0, -2.0], [0.5, 3.0]], [[0.0, 1.0], [2.0, -1.0]]]])
    dst = torch.tensor([[[[0.0, 1.0], [1.0, 0.0]], [[-1.0, 2.0], [0.0, 0.5]]]])
    expected = numpy_cwd(dst.numpy().astype(np.float64), src.numpy().astype(np.float64), 4.0)
    assert ChannelWiseDistillationLoss()(dst, src).item() == pytest.approx(expected, rel=1e-5)


def test_dist_loss_by_hand_and_against_numpy():
    # two samples, two classes: the student's probabilities are the teacher's mirrored, so every Pearson is -1
    src = torch.tensor([[math.log(3.0), 0.0], [0.0, math.log(3.0)]])
    assert DISTLoss()(src.flip(1), src).item() == pytest.approx(4.0, abs=1e-5)  # 1 · (1 · 2 + 1 · 2)
    torch.manual_seed(0)
    src, dst = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    expected = numpy_dist(dst.double().numpy(), src.double().numpy(), tau=2.0, beta=0.5, gamma=2.0)
    assert DISTLoss(2.0, beta=0.5, gamma=2.0)(dst, src).item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 3, 4, 4, 4), (4, 3)])
def test_losses_are_zero_when_the_student_is_the_teacher(shape):
    torch.manual_seed(0)
    z = torch.randn(shape)
    assert DISTLoss()(z, z).item() == pytest.approx(0.0, abs=1e-5)
    if len(shape) > 2:
        assert ChannelWiseDistillationLoss()(z, z).item() == pytest.approx(0.0, abs=1e-6)
        assert ChannelWiseDistillationLoss()(z, z + 1.0).item() == pytest.approx(0.0, abs=1e-6)  # shift-invariant


def test_losses_refuse_other_shapes():
    with pytest.raises(ValueError, match="one shape"):
        ChannelWiseDistillationLoss()(torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="same classes"):
        DISTLoss()(torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 4, 4))


def networks(unet=tiny_unet) -> dict[str, torch.nn.Module]:
    return {"teacher": unet((8, 16, 32), seed=0), "sp": unet((4, 8, 8), seed=1), "sf": unet((4, 8, 8), seed=2)}


def run_routes(routes: list[dict], nets: dict, x: torch.Tensor) -> tuple[KnowledgeRoutes, dict]:
    """The terms of ``routes`` for one forward of ``nets`` (train mode, with gradients) on ``x``."""
    graph = KnowledgeRoutes(routes, ["sp", "sf"])
    graph.setup(nets, x)
    logits = {name: net(x) for name, net in nets.items()}
    features = {name: graph.pop_features(name) for name in nets}
    return graph, graph(logits, features)


ROUTES = [
    {"source": "sp", "target": "sf", "kind": "channel"},
    {"source": "sp", "target": "sf", "kind": "channel", "signal": "features", "layers": "last_decoder"},
    {"source": "teacher", "target": "sf", "kind": "channel", "signal": "features"},  # bottleneck, 32 -> 8 channels
    {"source": "sp", "target": "sf", "kind": "dist"},
]


@pytest.mark.parametrize("route", ROUTES)
def test_gradients_reach_the_target_and_its_adapter_only(route):
    nets = networks()
    graph, terms = run_routes([route], nets, tiny_batches(n=1, batch_size=2)[0]["image"])
    (term,) = terms.values()
    term.backward()
    assert term.item() > 0
    assert all(p.grad is None for name in ("teacher", "sp") for p in nets[name].parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in nets["sf"].parameters())
    adapters = graph.parameters_of("sf")
    assert len(adapters) == (route["source"] == "teacher" and route.get("signal") == "features")
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters)


def test_kinds_work_in_3d():
    features = {"kind": "channel", "signal": "features", "layers": "last_decoder"}
    routes = [
        {"source": "teacher", "target": "sf", **features},  # the teacher's 8 channels there, sf's 4: an adapter
        {"source": "sf", "target": "sp", **features},  # 4 and 4: none
        {"source": "teacher", "target": "sp", "kind": "channel"},
        {"source": "teacher", "target": "sp", "kind": "dist"},
    ]
    graph, terms = run_routes(routes, networks(tiny_unet3d), tiny_batches3d(n=1, batch_size=2)[0]["image"])
    assert all(t.ndim == 0 and torch.isfinite(t) and t > 0 for t in terms.values()), terms
    assert [p.shape for p in graph.parameters_of("sf")] == [torch.Size([8, 4, 1, 1, 1])]
    assert graph.parameters_of("sp") == []


def test_last_decoder_is_the_finest_decoder_depth_and_named_layers_reach_it():
    x = torch.zeros(1, 1, 32, 32)
    teacher, student = networks()["teacher"], networks()["sp"]
    source, target = feature_depths(teacher, x), feature_depths(student, x)
    decoder = match_depths(source, target, "decoder")
    finest = max((d for d in source if d.role == "decoder"), key=lambda d: math.prod(d.size))
    assert match_depths(source, target, "last_decoder") == decoder[-1:] == [(finest.layer, finest.layer)]
    assert finest.size == (16, 16)  # a MONAI U-Net's last up layer makes the output: this is the one before it
    # the same map named by module: the U-Net's second up layer, inside the top skip connection
    nets = networks()
    named = {"source": "teacher", "target": "sp", "kind": "channel", "signal": "features"}
    _, by_name = run_routes([{**named, "layers": [["model.1.submodule.2", "model.1.submodule.2"]]}], nets, x)
    _, by_depth = run_routes([{**named, "layers": "last_decoder"}], networks(), x)
    assert torch.allclose(*by_name.values(), *by_depth.values())


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ({"kind": "channel", "signal": "logits"}, r"signal 'logits'; use one of \['predictions', 'features'\]"),
        ({"kind": "channel", "temperature": 0}, "temperature of route sp/channel_from_teacher must be .* > 0"),
        ({"kind": "channel", "layers": "decoder"}, "reads no layers with signal 'predictions'"),
        ({"kind": "channel", "signal": "features", "layers": "last"}, "must be .* or one of .*'last_decoder'"),
        ({"kind": "dist", "beta": -1}, "the beta of route sp/dist_from_teacher must be a finite number >= 0"),
        ({"kind": "dist", "layers": "decoder"}, r"\['layers'\] do\(es\) nothing on a dist route"),
    ],
)
def test_options_are_checked(route, message):
    with pytest.raises(ConfigError, match=message):
        Route.from_dict({"source": "teacher", "target": "sp", **route})


def test_channel_on_predictions_needs_segmentation_logits():
    graph = KnowledgeRoutes([{"source": "teacher", "target": "sp", "kind": "channel"}], ["sp"])
    with pytest.raises(ConfigError, match="needs segmentation logits"):
        graph({"teacher": torch.zeros(2, 3), "sp": torch.zeros(2, 3)}, {})
    dist = KnowledgeRoutes([{"source": "teacher", "target": "sp", "kind": "dist"}], ["sp"])
    assert torch.isfinite(dist({"teacher": torch.randn(4, 3), "sp": torch.randn(4, 3)}, {})["sp/dist_from_teacher"])


def test_named_weights_and_temperature_by_role():
    weights = {"kd_weight": 0.1, "hint_weight": 0.2, "peer_prediction_weight": 0.3, "peer_feature_weight": 0.4}
    listed = [
        {"source": "teacher", "target": "sp", "kind": "channel"},
        {"source": "teacher", "target": "sf", "kind": "channel", "signal": "features"},
        {"source": "teacher", "target": "sf", "kind": "dist"},
        {"source": "sp", "target": "sf", "kind": "channel", "signal": "features"},
        {"source": "sf", "target": "sp", "kind": "dist"},
    ]
    routes = parse_routes(listed, ["sp", "sf"], weights, temperature=2.0)
    assert [r.weight for r in routes] == [0.1, 0.2, 0.1, 0.4, 0.3]
    assert [r.temperature for r in routes] == [2.0, 2.0, 1.0, 2.0, 1.0]  # the bundle's τ is not DIST's


def test_presets_take_the_named_weights_and_layers():
    cwd = preset_routes("cwd", kd_weight=0.5, temperature=2.0)
    assert {(r.weight, r.temperature, r.options["signal"]) for r in cwd} == {(0.5, 2.0, "predictions")}
    assert {(r.kind, r.weight, r.temperature) for r in preset_routes("dist", kd_weight=0.5)} == {("dist", 0.5, 1.0)}
    diversified = preset_routes("diversified_cwd", kd_weight=0.5, hint_weight=2.0, peer_prediction_weight=3.0)
    assert [(r.name, r.weight, r.layers) for r in diversified] == [
        ("sp/channel_from_teacher", 0.5, None),
        ("sf/channel_from_teacher", 2.0, "last_decoder"),
        ("sp/prediction_from_sf", 3.0, None),
        ("sf/prediction_from_sp", 3.0, None),
    ]
    assert preset_routes("diversified_cwd", hint_layers="multi")[1].layers == "multi"
    with pytest.raises(ConfigError, match="diversified_cwd preset needs exactly two students"):
        preset_routes("diversified_cwd", ["a", "b", "c"])


@pytest.mark.parametrize("preset", ["cwd", "dist", "diversified_cwd"])
def test_one_trainer_step_with_each_new_preset(preset):
    trainer = tiny_trainer(preset, tiny_batches(n=1, batch_size=2))
    trainer.run()
    losses = trainer.state.output["losses"]
    names = {r.name for r in trainer.routes.routes}
    assert names <= set(losses) and all(math.isfinite(float(losses[n])) for n in names), losses
