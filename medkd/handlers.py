"""Handlers for distillation runs: per-term loss logging and a progress bar."""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar as _IgniteProgressBar
from monai.handlers import CheckpointSaver

from medkd.checkpoints import load_network_weights
from medkd.engines import LOSSES

__all__ = [
    "loss_terms",
    "student_totals",
    "EpochLossTerms",
    "ProgressBar",
    "BestCheckpoints",
    "LoadNetworks",
    "skip_empty_batches",
    "SkippedFilesReport",
]


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


class LoadNetworks:
    """Load ``{load_dir}/{name}.pt`` into each network when the engine starts (see
    :func:`medkd.checkpoints.load_network_weights`: a missing or mismatched file is named in the error).

    Args:
        load_dir: checkpoint folder (as written by :class:`BestCheckpoints`).
        networks: networks by name.
        map_location: device to load the tensors on.
    """

    def __init__(self, load_dir: str, networks: dict[str, torch.nn.Module], map_location: str = "cpu") -> None:
        self.load_dir = load_dir
        self.networks = networks
        self.map_location = map_location

    def attach(self, engine: Engine) -> None:
        """Load the weights at ``Events.STARTED`` of ``engine``."""
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        for name, network in self.networks.items():
            load_network_weights(network, f"{self.load_dir}/{name}.pt", map_location=self.map_location, role=name)


def skip_empty_batches(engine: Engine, batchdata: Any) -> dict:
    """``iteration_update`` for evaluators fed through :func:`medkd.checks.skip_none_collate`: a batch whose files
    were all unreadable (``None``) is skipped instead of stopping the run."""
    return {} if batchdata is None else engine._iteration(engine, batchdata)


class SkippedFilesReport:
    """At the end of a run, log which files a :class:`medkd.checks.SafeDataset` skipped (or that none was)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def attach(self, engine: Engine) -> None:
        """Report when ``engine`` completes."""
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        level = logging.WARNING if self.dataset.skipped else logging.INFO
        logging.getLogger("medkd").log(level, "%s (list: %s)", self.dataset.summary(), self.dataset.report_file)
