"""Learning-rate schedule of the training stages: polynomial decay per epoch, as nnU-Net trains its U-Nets."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from ignite.engine import Engine, Events

from medkd.errors import ConfigError

__all__ = ["PolyLR", "poly_factor"]


def poly_factor(epoch: int, max_epochs: int, power: float) -> float:
    """The fraction of the initial learning rate used in ``epoch`` (0-based) of ``max_epochs``:
    ``(1 - epoch / max_epochs) ** power``; 1 at the first epoch, about ``(1 / max_epochs) ** power`` at the last."""
    return (1.0 - min(epoch, max_epochs - 1) / max_epochs) ** power


class PolyLR:
    """Set every optimizer's learning rate at the start of each epoch to ``lr * (1 - e / max_epochs) ** power``
    (``e`` counted from 0), with ``lr`` the rate each parameter group had when the schedule first saw it (kept in the
    group as ``initial_lr``, which the optimizer's state dict saves).

    The rate follows from the engine's epoch alone, so a resumed run continues the schedule where it stopped.
    ``power=0`` keeps the rate constant.

    Args:
        optimizers: one optimizer or a mapping of them (e.g. one per student); all follow the same schedule.
            Default: the engine's, i.e. every network a ``DistillationTrainer`` trains (``trained_optimizers``: the
            students and an online teacher) or a ``TeacherTrainer``'s ``optimizer``.
        power: the exponent; 0.9 as nnU-Net.
        max_epochs: epochs the schedule spans (default: the engine's ``max_epochs``).
    """

    def __init__(
        self,
        optimizers: torch.optim.Optimizer | Mapping[str, torch.optim.Optimizer] | None = None,
        power: float = 0.9,
        max_epochs: int | None = None,
    ) -> None:
        if not power >= 0:
            raise ConfigError(f"lr_decay_power must be a number >= 0 (0 keeps the learning rate), got {power!r}.")
        self.optimizers = optimizers
        self.power = float(power)
        self.max_epochs = max_epochs

    def attach(self, engine: Engine) -> None:
        """Set the rates at every ``EPOCH_STARTED`` of ``engine``."""
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        """Apply the rate of the epoch that starts (``engine.state.epoch`` is already 1-based here)."""
        factor = poly_factor(engine.state.epoch - 1, self.max_epochs or engine.state.max_epochs, self.power)
        optimizers = self.optimizers
        if optimizers is None:  # the engine's, known once it is built (handlers attach in its constructor)
            optimizers = getattr(engine, "trained_optimizers", None) or engine.optimizer
        optimizers = optimizers.values() if isinstance(optimizers, Mapping) else [optimizers]
        for optimizer in optimizers:
            for group in optimizer.param_groups:  # groups added after construction (adapters) included
                group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor
