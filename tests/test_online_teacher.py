"""Online distillation: the teacher trained with the students by its own supervised loss, resumed, validated,
checkpointed; wrong settings are named."""

import copy
import math

import pytest
import torch
from bundle_utils import run_stage
from conftest import tiny_unet
from ignite.engine import Events
from monai.engines.utils import IterationEvents
from test_engine import make_trainer

from medkd.errors import ConfigError, user_error
from medkd.knowledge import teacher as teacher_roles
from medkd.knowledge.routes import Route
from medkd.knowledge.teacher import check_teacher_settings
from medkd.knowledge.teacher_cache import TeacherCache
from medkd.training.engines import iteration_losses
from medkd.training.handlers import ResumeCheckpoint
from medkd.training.teachers import FrozenTeacher, OnlineTeacher, make_teacher, start_checkpoint


def online_trainer(batches, teacher_seed=0, lr=1e-2, **kwargs):
    """``make_trainer`` with an online teacher (tiny U-Net) and its Adam optimizer."""
    teacher = tiny_unet((8, 16, 32), seed=teacher_seed)
    optimizer = torch.optim.Adam(teacher.parameters(), lr=lr)
    return make_trainer(batches, teacher=teacher, teacher_mode="online", teacher_optimizer=optimizer, lr=lr, **kwargs)


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_online_teacher_learns_from_its_own_loss_only(batches):
    """Its gradient is that of its supervised loss alone (the routes from it to the students detach it); its
    optimizer steps every iteration; its terms are logged."""
    trainer = online_trainer(batches)
    assert isinstance(trainer.teacher_role, OnlineTeacher) and list(trainer.trained_optimizers) == [
        "sp",
        "sf",
        "teacher",
    ]
    reference = copy.deepcopy(trainer.teacher)
    before = _state(trainer.teacher)
    grads = {}

    @trainer.on(IterationEvents.BACKWARD_COMPLETED)
    def keep_first_gradients(engine):
        if engine.state.iteration == 1:
            grads.update({n: p.grad.clone() for n, p in engine.teacher.named_parameters()})

    trainer.run()

    reference.train()
    trainer.loss_function(reference(batches[0]["image"]), batches[0]["label"]).mean().backward()
    assert grads.keys() == {n for n, _ in reference.named_parameters()}
    for name, p in reference.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert trainer.teacher.training and all(p.requires_grad for p in trainer.teacher.parameters())
    assert any(not torch.equal(v, before[k]) for k, v in _state(trainer.teacher).items())
    steps = [s["step"] for s in trainer.teacher_role.optimizer.state.values()]
    assert steps and all(int(s) == len(batches) for s in steps)
    terms = iteration_losses(trainer.state.output)
    assert terms["teacher/total"] == terms["teacher/sup"] and math.isfinite(terms["teacher/sup"])
    assert trainer.state.output[0]["loss"] == pytest.approx(
        terms["sp/total"] + terms["sf/total"] + terms["teacher/total"], rel=1e-5
    )


def test_online_teacher_trains_without_a_route_from_it(batches):
    trainer = online_trainer(batches[:1], routes="dml")
    before = _state(trainer.teacher)
    trainer.run()
    assert "teacher/sup" in iteration_losses(trainer.state.output)
    assert any(not torch.equal(v, before[k]) for k, v in _state(trainer.teacher).items())


def test_frozen_mode_is_the_default_and_unchanged(batches):
    trainer = make_trainer(batches[:1], teacher_mode="frozen")
    assert isinstance(trainer.teacher_role, FrozenTeacher) and trainer.teacher_role.optimizer is None
    assert list(trainer.trained_optimizers) == ["sp", "sf"] and trainer.checkpoint_objects().keys() == {
        "routes", "student_sp", "student_sf", "optimizer_sp", "optimizer_sf"
    }  # fmt: skip
    trainer.run()
    assert not any(k.startswith("teacher/") for k in iteration_losses(trainer.state.output))


def test_resumed_online_run_restores_the_teacher_and_its_optimizer(tmp_path, batches):
    """One epoch, saved; resumed (from a teacher of other initial weights) for a second epoch: the same teacher and
    optimizer state as two epochs straight."""
    first = online_trainer(batches, epochs=1)
    assert {"teacher", "optimizer_teacher"} <= first.checkpoint_objects().keys()
    ResumeCheckpoint(str(tmp_path)).attach(first)
    first.run()
    resumed = online_trainer(batches, epochs=2, teacher_seed=5)
    ResumeCheckpoint(str(tmp_path)).attach(resumed)
    resumed.run()
    straight = online_trainer(batches, epochs=2)
    straight.run()
    assert resumed.state.iteration == straight.state.iteration == 2 * len(batches)
    for key, value in _state(straight.teacher).items():
        torch.testing.assert_close(_state(resumed.teacher)[key], value, msg=key)
    a, b = resumed.teacher_role.optimizer.state_dict(), straight.teacher_role.optimizer.state_dict()
    for index, state in b["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(a["state"][index][key], value, msg=f"{index}.{key}")


def test_gradient_scaler_steps_the_online_teacher_too(batches):
    """With a float16 gradient scaler (made by run() on CUDA; a CPU one here), the teacher's step is unscaled like
    the students': with SGD, the same weights as without a scaler (a plain step would move them 65536 times as
    far)."""
    weights = []
    for scaler in (None, torch.amp.GradScaler("cpu")):
        teacher = tiny_unet((8, 16, 32), seed=0)
        trainer = make_trainer(
            batches[:1],
            routes="kd",
            teacher=teacher,
            teacher_mode="online",
            teacher_optimizer=torch.optim.SGD(teacher.parameters(), lr=1e-3),
        )
        trainer.add_event_handler(Events.STARTED, lambda engine, s=scaler: setattr(engine, "scaler", s))
        trainer.run()
        assert ("scaler" in trainer.checkpoint_objects()) == (scaler is not None)
        weights.append(_state(trainer.teacher))
    before = _state(tiny_unet((8, 16, 32), seed=0))
    assert any(not torch.equal(v, before[k]) for k, v in weights[1].items())
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, msg=key)


def test_non_finite_teacher_loss_is_named_or_skipped(batches):
    bad = [dict(b, image=b["image"] * float("nan")) for b in batches[:1]]
    with pytest.raises(FloatingPointError, match=r"teacher/sup=nan"):
        online_trainer(bad, routes="student").run()
    trainer = online_trainer(bad, routes="student", nan_policy="skip")
    before = _state(trainer.teacher)
    with pytest.warns(UserWarning, match="skipping the step"):
        trainer.run()
    assert all(torch.equal(v, before[k]) for k, v in _state(trainer.teacher).items())


def test_online_teacher_starts_from_a_checkpoint(tmp_path):
    source = tiny_unet((8, 16, 32), seed=7)
    torch.save({"network": source.state_dict()}, tmp_path / "teacher.pt")
    network = tiny_unet((8, 16, 32), seed=0)
    role = make_teacher(network, "online", tmp_path / "teacher.pt", torch.optim.SGD(network.parameters(), lr=0.1))
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in role.network.state_dict().items())
    assert role.checkpoint_objects().keys() == {"teacher", "optimizer_teacher"}


def test_wrong_teacher_settings_are_config_errors(tmp_path, batches):
    with pytest.raises(ConfigError, match=r"teacher_mode must be 'frozen' or 'online', got 'offline'"):
        make_trainer(batches, teacher_mode="offline")
    with pytest.raises(ConfigError, match=r"teacher_mode must be 'frozen' or 'online'"):
        make_trainer(batches, routes="dml", teacher_mode="offline")  # checked even when no route reads the teacher
    with pytest.raises(ConfigError, match="give the teacher optimizer"):
        make_trainer(batches, teacher_mode="online")
    other = tiny_unet((8, 16, 32))
    with pytest.raises(ConfigError, match="holds none of the teacher network's parameters"):
        make_trainer(batches, teacher_mode="online", teacher_optimizer=torch.optim.SGD(other.parameters(), lr=0.1))
    with pytest.raises(ConfigError, match="cannot use a teacher cache"):
        online_trainer(batches, teacher_cache=TeacherCache())
    with pytest.raises(ConfigError, match="does not train the teacher"):
        make_trainer(batches, teacher_optimizer=torch.optim.SGD(other.parameters(), lr=0.1))
    with pytest.raises(ConfigError, match="targets must be students"):
        online_trainer(batches, routes=[Route("sp", "teacher", "prediction")])
    with pytest.raises(ConfigError, match=r"teacher_init must be 'checkpoint' or 'scratch', got 'random'"):
        check_teacher_settings("online", "random")
    with pytest.raises(ConfigError, match="needs teacher_mode 'online'"):
        check_teacher_settings("frozen", "scratch")
    with pytest.raises(ConfigError, match="would replace it"):
        check_teacher_settings(
            "online", "checkpoint", tmp_path / "teacher.pt", [tmp_path / "sp.pt", tmp_path / "teacher.pt"]
        )
    check_teacher_settings("online", "checkpoint", tmp_path / "trained" / "teacher.pt", [tmp_path / "teacher.pt"])
    check_teacher_settings("frozen", "checkpoint", tmp_path / "teacher.pt", [tmp_path / "teacher.pt"])


def _bundle_error(root, **overrides):
    with pytest.raises(Exception) as info:
        run_stage("segmentation_2d", "train", root, **overrides)
    error = user_error(info.value)
    assert isinstance(error, ConfigError), info.value
    return str(error)


def test_bundle_names_a_wrong_teacher_mode_or_a_clashing_checkpoint(tmp_path):
    assert "teacher_mode must be 'frozen' or 'online', got 'offline'" in _bundle_error(tmp_path, teacher_mode="offline")
    message = _bundle_error(tmp_path, teacher_mode="online", teacher_init="checkpoint")
    assert "teacher.pt is also where this run saves the online teacher's best checkpoint" in message
    assert not (tmp_path / "models").exists()  # stopped before training


def test_bundle_trains_validates_and_checkpoints_an_online_teacher(tmp_path):
    """Segmentation bundle, one epoch, teacher_mode online (from scratch: no teacher stage before it)."""
    workflow = run_stage("segmentation_2d", "train", tmp_path, teacher_mode="online")
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert isinstance(trainer.teacher_role, OnlineTeacher)
    assert {"teacher/sup", "teacher/total", "sp/prediction_from_teacher"} <= set(iteration_losses(trainer.state.output))
    best = torch.load(tmp_path / "models" / "teacher.pt", weights_only=True)
    assert best["fingerprint"]["teacher_mode"] == "online" and best["fingerprint"]["teacher_init"] == "scratch"
    assert best["teacher"].keys() == trainer.teacher.state_dict().keys()
    last = torch.load(tmp_path / "models" / "last.pt", weights_only=True)
    assert {"teacher", "optimizer_teacher"} <= last.keys() and last["best"]["best"].keys() == {"teacher", "sp", "sf"}
    history = (tmp_path / "eval" / "history_students.csv").read_text().splitlines()[0].split(",")
    assert history == ["epoch", *(f"val_mean_dice_{n}" for n in ("teacher", "sp", "sf", "ensemble"))]
    assert not (tmp_path / "models" / "ensemble.pt").exists()

    with pytest.raises(Exception) as info:  # resuming it as a frozen-teacher run is another run
        run_stage("segmentation_2d", "train", tmp_path, max_epochs=2)
    assert "teacher mode online → frozen" in str(user_error(info.value))


def test_bundle_choices_follow_the_teacher_mode():
    """The helpers the bundle JSON calls instead of inline conditionals."""
    net, students = tiny_unet(), {"sp": tiny_unet(seed=1)}
    assert teacher_roles.default_init("frozen") == "checkpoint" and teacher_roles.default_init("online") == "scratch"
    assert start_checkpoint("t.pt", "checkpoint") == "t.pt"
    assert start_checkpoint("t.pt", "scratch") is None
    assert teacher_roles.online_optimizer("frozen", torch.optim.SGD, net) is None
    optimizer = teacher_roles.online_optimizer("online", lambda p: torch.optim.SGD(p, lr=0.1), net)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in net.parameters()}
    assert list(teacher_roles.validated_networks("frozen", net, students)) == ["sp"]
    assert list(teacher_roles.validated_networks("online", net, students)) == ["teacher", "sp"]
    assert teacher_roles.trained_teacher("frozen", net, "cpu") is net  # replicated, not wrapped
    for bad in (lambda: teacher_roles.default_init("offline"), lambda: start_checkpoint("t.pt", "x")):
        with pytest.raises(ConfigError, match="teacher_"):
            bad()
