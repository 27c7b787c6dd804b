"""Handlers for distillation runs: per-term loss logging and a progress bar."""

from __future__ import annotations

from collections import defaultdict

import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar as _IgniteProgressBar
from monai.handlers import CheckpointSaver

from medkd.engines import LOSSES

__all__ = ["loss_terms", "student_totals", "EpochLossTerms", "ProgressBar", "BestCheckpoints"]


def loss_terms(output: dict) -> dict[str, torch.Tensor]:
    """Output transform giving every loss term of a ``DistillationTrainer`` iteration, for MONAI's
    ``StatsHandler`` / ``TensorBoardStatsHandler`` (which log each key of a dict)."""
    return output[LOSSES]


def student_totals(output: dict) -> dict[str, float]:
    """Each student's total loss as a float (one host sync per student), for the progress bar."""
    return {k.split("/")[0]: float(v) for k, v in output[LOSSES].items() if k.endswith("/total")}


class EpochLossTerms:
    """Average every loss term over the epoch into ``engine.state.metrics["loss/<term>"]``.

    Terms are summed on the device and read once per epoch, so the handler adds no per-iteration host sync.
    MONAI's ``StatsHandler``, ``TensorBoardStatsHandler`` and ``MLFlowHandler`` then log them with the metrics.
    """

    def attach(self, engine: Engine) -> None:
        """Register the accumulation and the epoch summary on ``engine``."""
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._accumulate)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._summarise)

    def _reset(self, engine: Engine) -> None:
        self._sums: dict[str, torch.Tensor] = defaultdict(float)  # type: ignore[arg-type]
        self._count = 0

    def _accumulate(self, engine: Engine) -> None:
        for name, value in engine.state.output[LOSSES].items():
            self._sums[name] = self._sums[name] + value.detach().float()
        self._count += 1

    def _summarise(self, engine: Engine) -> None:
        for name, total in self._sums.items():
            engine.state.metrics[f"loss/{name}"] = float(total) / max(self._count, 1)


class ProgressBar(_IgniteProgressBar):
    """tqdm progress bar over the iterations of each epoch, showing every student's total loss."""

    def __init__(self, persist: bool = False, **tqdm_kwargs) -> None:
        super().__init__(persist=persist, **tqdm_kwargs)

    def attach(self, engine: Engine) -> None:  # type: ignore[override]
        """Attach to ``engine`` (MONAI calls ``attach(engine)`` on every handler of a workflow)."""
        super().attach(engine, output_transform=student_totals)


class BestCheckpoints:
    """Keep the best checkpoint of each network by its own validation metric (MONAI ``CheckpointSaver``s).

    Attach to the validation evaluator. Network ``name`` is saved as ``{save_dir}/{name}.pt`` holding
    ``{name: state_dict}`` whenever ``metrics[f"{metric_prefix}_{name}"]`` improves.

    Args:
        save_dir: checkpoint folder.
        networks: networks by name.
        metric_prefix: metric name prefix, e.g. ``"val_mean_dice"`` or ``"val_auc"``.
    """

    def __init__(self, save_dir: str, networks: dict[str, torch.nn.Module], metric_prefix: str) -> None:
        self.savers = [
            CheckpointSaver(
                save_dir=save_dir,
                save_dict={name: network},
                save_key_metric=True,
                key_metric_name=f"{metric_prefix}_{name}",
                key_metric_filename=f"{name}.pt",
                key_metric_save_state=True,
            )
            for name, network in networks.items()
        ]

    def attach(self, engine: Engine) -> None:
        """Attach one ``CheckpointSaver`` per network."""
        for saver in self.savers:
            saver.attach(engine)
