"""DistillationTrainer: frozen teacher, routes that reach only their students, every preset trains."""

import math

import pytest
import torch
from conftest import tiny_batches, tiny_unet
from ignite.engine import Events
from monai.handlers import from_engine
from monai.losses import DiceCELoss
from monai.networks.nets import UNet

from medkd.errors import ConfigError
from medkd.knowledge.routes import PRESETS, Route
from medkd.training.engines import DistillationTrainer, iteration_losses
from medkd.training.handlers import EpochLossTerms


def make_trainer(batches, routes="diversified", epochs=1, lr=1e-2, **kwargs) -> DistillationTrainer:
    students = {"sp": tiny_unet((4, 8, 8), seed=1), "sf": tiny_unet((4, 8, 8), seed=2)}
    optimizers = {n: torch.optim.Adam(s.parameters(), lr=lr) for n, s in students.items()}
    kwargs.setdefault("teacher", tiny_unet((8, 16, 32), seed=0))
    return DistillationTrainer(
        device="cpu",
        max_epochs=epochs,
        train_data_loader=batches,
        students=students,
        optimizers=optimizers,
        loss_function=DiceCELoss(to_onehot_y=True, softmax=True),
        routes=routes,
        **kwargs,
    )


def test_teacher_gets_no_gradient_and_does_not_change(batches):
    trainer = make_trainer(batches)
    before = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    trainer.run()
    assert not trainer.teacher.training
    assert all(p.grad is None and not p.requires_grad for p in trainer.teacher.parameters())
    for k, v in trainer.teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    terms = iteration_losses(trainer.state.output)
    assert set(terms) == {
        "sp/sup", "sf/sup", "sp/total", "sf/total",
        "sp/prediction_from_teacher", "sf/feature_from_teacher",
        "sp/prediction_from_sf", "sf/prediction_from_sp", "sp/feature_from_sf", "sf/feature_from_sp",
    }  # fmt: skip
    assert all(math.isfinite(v) for v in terms.values())


def test_output_is_decollated_like_supervised_trainer_or_kept_as_one_dict(batches):
    """decollate=True (default): per-sample dicts with the loss replicated as a float, so MONAI handlers configured
    for SupervisedTrainer (from_engine(["loss"], first=True): MLflow, StatsHandler) read it; decollate=False: one
    dict of detached tensors. Both give the same terms, and EpochLossTerms averages either."""
    outputs = {}
    for decollate in (True, False):
        torch.manual_seed(0)
        trainer = make_trainer(batches[:1], decollate=decollate)
        EpochLossTerms().attach(trainer)
        trainer.run()
        outputs[decollate] = (trainer.state.output, trainer.state.metrics)
    (items, metrics), (single, single_metrics) = outputs[True], outputs[False]
    assert isinstance(items, list) and len(items) == batches[0]["image"].shape[0]
    loss = from_engine(["loss"], first=True)(items)
    assert isinstance(loss, float) and all(item["loss"] == loss for item in items)
    assert isinstance(single, dict) and single["loss"].ndim == 0
    assert items[0]["pred"]["sp"].shape == single["pred"]["sp"].shape[1:]
    assert loss == pytest.approx(float(single["loss"]), rel=1e-5)
    terms, single_terms = iteration_losses(items), iteration_losses(single)
    assert set(terms) == set(single_terms) and all(
        terms[k] == pytest.approx(float(single_terms[k]), rel=1e-5, abs=1e-7) for k in terms
    )
    assert metrics["loss/sp/total"] == pytest.approx(single_metrics["loss/sp/total"], rel=1e-5)


def _grads(module):
    return [p.grad for p in module.parameters()]


def test_each_student_gets_gradients_only_from_its_own_routes(batches):
    """In the diversified preset, the prediction student's loss does not depend on the teacher's features,
    and no term of one student's loss sends gradient into the other student."""
    trainer = make_trainer(batches)
    inputs, targets = batches[0]["image"], batches[0]["label"]
    teacher_logits = trainer.teacher(inputs)
    teacher_feats = trainer.routes.pop_features("teacher")
    teacher_feats = {k: v.detach().clone().requires_grad_(True) for k, v in teacher_feats.items()}
    teacher_logits = teacher_logits.detach().clone().requires_grad_(True)
    logits, feats = {"teacher": teacher_logits}, {"teacher": teacher_feats}
    for name, net in trainer.students.items():
        logits[name] = net(inputs)
        feats[name] = trainer.routes.pop_features(name)
    supervised = {name: trainer.loss_function(logits[name], targets) for name in trainer.students}
    terms = trainer.routes.losses(logits, feats, supervised, targets)

    terms["sp/total"].backward(retain_graph=True)
    assert all(g is None for g in _grads(trainer.students["sf"]))
    assert all(v.grad is None for v in teacher_feats.values())  # sp does not learn from teacher features
    assert teacher_logits.grad is None  # sources are detached
    assert any(g is not None and g.abs().sum() > 0 for g in _grads(trainer.students["sp"]))

    for net in trainer.students.values():
        net.zero_grad(set_to_none=True)
    terms["sf/total"].backward()
    assert all(g is None for g in _grads(trainer.students["sp"]))
    assert any(g is not None and g.abs().sum() > 0 for g in _grads(trainer.students["sf"]))
    # the adapter of sf's feature routes is trained with sf's optimizer
    sf_params = {id(p) for g in trainer.optimizers["sf"].param_groups for p in g["params"]}
    assert all(id(p) in sf_params for p in trainer.routes.parameters_of("sf"))
    assert trainer.routes.parameters_of("sf"), "teacher (32 ch) -> sf (8 ch) feature route needs an adapter"


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_trains_and_loss_goes_down(preset):
    data = tiny_batches(n=4, batch_size=4, size=32, seed=1)
    trainer = make_trainer(data, routes=preset, epochs=6)
    EpochLossTerms().attach(trainer)
    history = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: history.append(dict(e.state.metrics)))
    trainer.run()
    assert trainer.state.epoch == 6
    sup = [h["loss/sp/sup"] for h in history]
    assert sup[-1] < sup[0] * 0.9, sup  # the student learns its labels under every preset
    if preset != "dist":  # DIST's correlations with this untrained teacher need not fall as the student learns
        total = [h["loss/sp/total"] for h in history]
        assert total[-1] < total[0] * 0.9, total


def test_unknown_layer_and_missing_teacher_are_clear(batches):
    with pytest.raises(ConfigError, match="network 'teacher' has no module named 'nope'"):
        make_trainer(batches, feature_layers={"teacher": ["nope"]})
    with pytest.raises(ValueError, match="no teacher network was given"):
        make_trainer(batches, routes="kd", teacher=None)
    with pytest.raises(ValueError, match="unknown target 'sx'"):
        make_trainer(batches, routes=[Route("teacher", "sx", "prediction")])


def test_teacher_checkpoint_is_loaded_and_bad_one_named(tmp_path, batches):
    source = tiny_unet((8, 16, 32), seed=7)
    path = tmp_path / "teacher.pt"
    torch.save({"network": source.state_dict()}, path)
    trainer = make_trainer(batches, routes="kd", teacher_checkpoint=str(path))
    for k, v in trainer.teacher.state_dict().items():
        assert torch.equal(v, source.state_dict()[k])
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match=r"teacher\.pt cannot be read"):
        make_trainer(batches, routes="kd", teacher_checkpoint=str(path))
    torch.save(tiny_unet((4, 8, 8)).state_dict(), path)
    with pytest.raises(RuntimeError, match=r"teacher\.pt does not match the teacher") as err:
        make_trainer(batches, routes="kd", teacher_checkpoint=str(path))
    message = str(err.value)  # the first mismatches, then how many more, then what to do: not torch's every line
    assert "size mismatch for " in message and " more. It was trained with other network settings" in message
    assert message.count("size mismatch") <= 3 and len(message) < 1000


def test_a_skipped_step_leaves_weights_and_batchnorm_statistics_as_before(batches):
    """nan_policy='skip' is NonFiniteLoss's policy: a step with a NaN batch leaves every student's weights and
    BatchNorm running statistics (updated by its forward pass) as after the step before it."""
    bad = dict(batches[1], image=batches[1]["image"] * float("nan"))
    states = []
    for data in ([batches[0]], [batches[0], bad]):
        students = {}
        for seed, name in enumerate(("sp", "sf")):
            torch.manual_seed(seed)
            students[name] = UNet(2, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1, norm="batch")
        trainer = DistillationTrainer(
            device="cpu",
            max_epochs=1,
            train_data_loader=data,
            students=students,
            optimizers={n: torch.optim.Adam(s.parameters(), lr=1e-2) for n, s in students.items()},
            loss_function=DiceCELoss(to_onehot_y=True, softmax=True),
            routes="dml",
            nan_policy="skip",
        )
        if len(data) == 2:
            with pytest.warns(UserWarning, match=r"skipping the step at epoch 1, iteration 2: .*sp/sup=nan"):
                trainer.run()
        else:
            trainer.run()
        states.append({f"{n}.{k}": v.clone() for n, s in students.items() for k, v in s.state_dict().items()})
    assert any("running_mean" in k for k in states[0])
    assert all(torch.equal(states[1][k], v) for k, v in states[0].items())
    assert trainer.nonfinite.skipped == 1


def test_non_finite_loss_is_reported_or_skipped(batches):
    bad = [dict(b, image=b["image"] * float("nan")) for b in batches]
    with pytest.raises(FloatingPointError, match=r"epoch 1, iteration 1: .*sp/sup=nan"):
        make_trainer(bad, routes="student").run()
    trainer = make_trainer(bad, routes="student", nan_policy="skip")
    before = [p.clone() for p in trainer.students["sp"].parameters()]
    with pytest.warns(UserWarning, match="skipping the step"):
        trainer.run()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.students["sp"].parameters(), strict=True))
