"""Route kinds as classes: a kind of one's own from bundle JSON, the attention kind, options checked by each kind."""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_batches, tiny_unet
from monai.bundle import ConfigParser
from monai.losses import DiceCELoss

from medkd.errors import ConfigError
from medkd.knowledge.losses import FeatureDistillationLoss
from medkd.knowledge.routes import ROUTE_KINDS, KnowledgeRoutes, Route, RouteKind, parse_routes, register_kind
from medkd.training.engines import DistillationTrainer, iteration_losses
from medkd.training.teachers import FrozenTeacher


class LogitMSE(RouteKind):
    """A kind of one's own: ``scale`` times the MSE between the target's logits and the (detached) source's."""

    name = "logit_mse"
    options = {"scale": 1.0}

    def forward(self, outputs):
        source, target = outputs.logits[self.route.source], outputs.logits[self.route.target]
        return self.route.options["scale"] * F.mse_loss(target.float(), source.detach().float())


STUDENT = {"_target_": "UNet", "spatial_dims": 2, "in_channels": 1, "out_channels": 2, "channels": [4, 8, 8],
           "strides": [2, 2], "num_res_units": 1}  # fmt: skip


def bundle_trainer(routes: list) -> DistillationTrainer:
    """A DistillationTrainer as a bundle's train.json writes it, with ``routes`` as JSON route dicts."""
    optimizer = {"_target_": "torch.optim.Adam", "lr": 0.01}
    config = {
        "student_def": STUDENT,
        "students": {"sp": "%student_def", "sf": "%student_def"},
        "routes": routes,
        "trainer": {
            "_target_": "medkd.training.engines.DistillationTrainer",
            "device": "cpu",
            "max_epochs": 1,
            "train_data_loader": "$conftest.tiny_batches(n=2, batch_size=2)",
            "students": "@students",
            "optimizers": {
                "sp": {**optimizer, "params": "$@students#sp.parameters()"},
                "sf": {**optimizer, "params": "$@students#sf.parameters()"},
            },
            "loss_function": {"_target_": "DiceCELoss", "to_onehot_y": True, "softmax": True},
            "teacher": "$conftest.tiny_unet((8, 16, 32), seed=0)",
            "routes": "@routes",
        },
    }
    return ConfigParser(config, globals={"conftest": "conftest"}).get_parsed_content("trainer")


def test_a_kind_of_ones_own_trains_from_bundle_json_and_reaches_only_its_target():
    torch.manual_seed(0)
    trainer = bundle_trainer(
        [
            {"source": "teacher", "target": "sp", "kind": "test_route_kinds.LogitMSE", "weight": 2.0, "scale": 0.5},
            {"source": "sf", "target": "sp", "kind": "test_route_kinds.LogitMSE"},
        ]
    )
    trainer.run()
    assert trainer.state.iteration == 2
    terms = iteration_losses(trainer.state.output)
    assert set(terms) == {"sp/sup", "sf/sup", "sp/total", "sf/total",
                          "sp/logit_mse_from_teacher", "sp/logit_mse_from_sf"}  # fmt: skip
    assert all(math.isfinite(v) for v in terms.values()) and terms["sp/logit_mse_from_teacher"] > 0
    expected = terms["sp/sup"] + 2.0 * terms["sp/logit_mse_from_teacher"] + terms["sp/logit_mse_from_sf"]
    assert terms["sp/total"] == pytest.approx(expected, rel=1e-5)
    assert terms["sf/total"] == pytest.approx(terms["sf/sup"], rel=1e-6)
    assert [r.options for r in trainer.routes.routes] == [{"scale": 0.5}, {"scale": 1.0}]

    # the kind's terms send gradients to their target only: not to the source student, not to the teacher
    inputs = tiny_batches(n=1, batch_size=2)[0]["image"]
    logits = {name: net(inputs) for name, net in trainer.students.items()}
    logits["teacher"] = trainer.teacher(inputs).detach().requires_grad_(True)
    for name in ("teacher", "sp", "sf"):
        trainer.routes.pop_features(name)
    for net in trainer.students.values():
        net.zero_grad(set_to_none=True)
    route_terms = trainer.routes(logits, {})
    (route_terms["sp/logit_mse_from_teacher"] + route_terms["sp/logit_mse_from_sf"]).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.students["sp"].parameters())
    assert all(p.grad is None for p in trainer.students["sf"].parameters())
    assert logits["teacher"].grad is None


def test_a_registered_kind_is_named_by_its_registry_name():
    register_kind("logit_mse_test", LogitMSE)
    register_kind("logit_mse_test", LogitMSE)  # the same class again: nothing happens
    try:
        (route,) = parse_routes([{"source": "sf", "target": "sp", "kind": "logit_mse_test", "scale": 3}], ["sp", "sf"])
        assert route.name == "sp/logit_mse_test_from_sf" and route.options == {"scale": 3}
        assert Route("sf", "sp", LogitMSE).name == "sp/logit_mse_from_sf"  # the class itself, e.g. "$mypkg.Kind"
        with pytest.raises(ConfigError, match="already"):
            register_kind("logit_mse_test", type("Other", (LogitMSE,), {"name": "other"}))
        with pytest.raises(ConfigError, match=r"sets no `name` of its own"):
            Route("sf", "sp", type("Nameless", (LogitMSE,), {}))
        with pytest.raises(ConfigError, match=r"kind 'medkd\.nope\.Kind', which cannot be imported"):
            Route("sf", "sp", "medkd.nope.Kind")
    finally:
        ROUTE_KINDS.pop("logit_mse_test")


@pytest.mark.parametrize(
    "kind, option, accepted",
    [
        ("prediction", "mode", "['weight', 'warmup_epochs', 'temperature', 'class_weights']"),
        ("feature", "temperature", "['weight', 'warmup_epochs', 'layers', 'mode']"),
        ("attention", "mode", "['weight', 'warmup_epochs', 'layers']"),
        ("affinity", "mode", "['weight', 'warmup_epochs', 'layers', 'grid']"),
        ("region", "mode", "['weight', 'warmup_epochs', 'signal', 'regions', 'temperature', 'layers']"),
        ("test_route_kinds.LogitMSE", "scaling", "['weight', 'warmup_epochs', 'scale']"),
    ],
)
def test_each_kind_names_the_options_it_accepts(kind, option, accepted):
    route = {"source": "teacher", "target": "sp", "kind": kind, option: 1}
    with pytest.raises(ConfigError, match=rf"unknown keys \['{option}'\] do\(es\) nothing on a .* route, which "
                       rf"accepts {re.escape(accepted)}; remove them or fix the spelling"):  # fmt: skip
        parse_routes([route], ["sp"])


def test_attention_kind_equals_feature_routes_in_attention_mode():
    """The attention kind is the old feature route with mode "attention": same numbers, same training, no adapter."""
    results = {}
    for kind in ({"kind": "attention"}, {"kind": "feature", "mode": "attention"}):
        torch.manual_seed(0)
        students = {"sp": tiny_unet((4, 8, 8), seed=1), "sf": tiny_unet((4, 8, 8), seed=2)}
        trainer = DistillationTrainer(
            device="cpu",
            max_epochs=1,
            train_data_loader=tiny_batches(n=2, batch_size=2),
            students=students,
            optimizers={n: torch.optim.Adam(s.parameters(), lr=1e-2) for n, s in students.items()},
            loss_function=DiceCELoss(to_onehot_y=True, softmax=True),
            teacher=tiny_unet((8, 16, 32), seed=0),
            routes=[{"source": "teacher", "target": "sf", "weight": 2.0, **kind}],
            decollate=False,
        )
        assert trainer.routes.parameters_of("sf") == []  # attention maps need no adapter (32 -> 8 channels)
        trainer.run()
        results[kind["kind"]] = trainer
    new, old = results["attention"], results["feature"]
    new_terms, old_terms = iteration_losses(new.state.output), iteration_losses(old.state.output)
    assert float(new_terms["sf/attention_from_teacher"]) > 0
    assert torch.equal(new_terms["sf/attention_from_teacher"], old_terms["sf/feature_from_teacher"])
    assert torch.equal(new_terms["sf/total"], old_terms["sf/total"])
    for a, b in zip(new.students["sf"].parameters(), old.students["sf"].parameters(), strict=True):
        assert torch.equal(a, b)

    # and both are FeatureDistillationLoss(mode="attention") on the default layers, as before route kinds
    inputs = tiny_batches(n=1, batch_size=2, seed=5)[0]["image"]
    logits = {name: net(inputs) for name, net in new.networks.items()}
    features = {name: new.routes.pop_features(name) for name in new.networks}
    layer = "model.1.submodule.1.submodule"
    reference = FeatureDistillationLoss(8, 32, 2, mode="attention")(features["sf"][layer], features["teacher"][layer])
    assert torch.equal(new.routes(logits, features)["sf/attention_from_teacher"], reference)


def test_term_names_are_unique_and_old_adapter_states_load():
    routes = [Route("teacher", "sp", "feature"), Route("teacher", "sp", "feature", mode="attention")]
    with pytest.raises(ConfigError, match="two routes have the term name sp/feature_from_teacher"):
        KnowledgeRoutes(routes, ["sp"])
    graph = KnowledgeRoutes([Route("teacher", "sp", "feature")], ["sp"])
    graph.setup({"teacher": tiny_unet((8, 16, 32)), "sp": tiny_unet((4, 8, 8))}, torch.zeros(1, 1, 32, 32))
    (adapter,) = graph.parameters_of("sp")
    weight = torch.randn_like(adapter)
    # a resume checkpoint written before route kinds held the adapters under feature_losses.<route>.<i>
    graph.load_state_dict({"feature_losses.sp/feature_from_teacher.0.adapter.weight": weight})
    assert torch.equal(adapter, weight)


def test_checkpoint_objects_name_what_a_resume_checkpoint_holds():
    students = {"sp": tiny_unet((4, 8, 8), seed=1), "sf": tiny_unet((4, 8, 8), seed=2)}
    optimizers = {n: torch.optim.Adam(s.parameters()) for n, s in students.items()}
    teacher = FrozenTeacher(tiny_unet((8, 16, 32)))
    trainer = DistillationTrainer("cpu", 1, tiny_batches(n=1), students, optimizers, torch.nn.MSELoss(), teacher)
    assert trainer.teacher is teacher.network and trainer.teacher_role is teacher
    objects = trainer.checkpoint_objects()
    assert objects == {"routes": trainer.routes, "student_sp": students["sp"], "optimizer_sp": optimizers["sp"],
                       "student_sf": students["sf"], "optimizer_sf": optimizers["sf"]}  # fmt: skip
    assert all(callable(o.state_dict) and callable(o.load_state_dict) for o in objects.values())
    assert len(optimizers["sf"].param_groups) == 2  # the teacher -> sf adapter is trained with sf
