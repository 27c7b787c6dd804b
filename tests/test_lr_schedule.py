"""The polynomial learning-rate decay of the training stages."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine, Events

from medkd.errors import ConfigError
from medkd.training.lr_schedule import PolyLR, poly_factor


def test_poly_factor_starts_at_one_and_decays_to_the_last_epoch():
    assert poly_factor(0, 10, 0.9) == 1.0
    assert poly_factor(5, 10, 1.0) == pytest.approx(0.5)
    assert poly_factor(9, 10, 0.9) == pytest.approx(0.1**0.9)
    assert poly_factor(12, 10, 0.9) == pytest.approx(0.1**0.9)  # past the end (a longer resumed run): no negatives
    assert poly_factor(7, 10, 0.0) == 1.0


def test_every_optimizer_and_late_group_follows_the_epoch():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    optimizers = {"sp": torch.optim.Adam(a.parameters(), lr=0.01), "sf": torch.optim.SGD(b.parameters(), lr=0.1)}
    engine = Engine(lambda e, batch: None)
    PolyLR(optimizers, power=1.0).attach(engine)
    optimizers["sp"].add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.02})  # an adapter
    seen = []
    engine.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: seen.append([g["lr"] for g in optimizers["sp"].param_groups])
    )
    engine.run([0], max_epochs=4)
    assert [lr for epoch in seen for lr in epoch] == pytest.approx(
        [0.01, 0.02, 0.0075, 0.015, 0.005, 0.01, 0.0025, 0.005]
    )
    assert optimizers["sf"].param_groups[0]["lr"] == pytest.approx(0.025)


def test_resumed_optimizer_keeps_its_schedule():
    net = torch.nn.Linear(2, 2)
    first = torch.optim.Adam(net.parameters(), lr=0.01)
    engine = Engine(lambda e, batch: None)
    PolyLR(first, power=1.0).attach(engine)
    engine.run([0], max_epochs=2)
    resumed = torch.optim.Adam(net.parameters(), lr=0.01)
    resumed.load_state_dict(first.state_dict())  # what ResumeCheckpoint does
    engine = Engine(lambda e, batch: None)
    PolyLR(resumed, power=1.0, max_epochs=4).attach(engine)
    engine.state.epoch = 2
    engine.run([0], max_epochs=4)
    assert resumed.param_groups[0]["lr"] == pytest.approx(0.0025)


def test_default_optimizers_are_the_engines():
    net = torch.nn.Linear(2, 2)
    engine = Engine(lambda e, batch: None)
    engine.optimizer = torch.optim.SGD(net.parameters(), lr=0.1)  # a TeacherTrainer's
    PolyLR(power=1.0).attach(engine)
    engine.run([0], max_epochs=2)
    assert engine.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    engine = Engine(lambda e, batch: None)
    engine.trained_optimizers = {"sp": torch.optim.SGD(net.parameters(), lr=0.1)}  # a DistillationTrainer's
    PolyLR(power=1.0).attach(engine)
    engine.run([0], max_epochs=4)
    assert engine.trained_optimizers["sp"].param_groups[0]["lr"] == pytest.approx(0.025)


def test_negative_power_is_a_config_error():
    with pytest.raises(ConfigError, match="lr_decay_power"):
        PolyLR(torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1), power=-1)
