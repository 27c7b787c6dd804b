"""Handlers for distillation runs: loss-term logging, progress, best and resume checkpoints, skipped files."""

from __future__ import annotations

import csv
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar as _IgniteProgressBar

from medkd.checkpoints import CheckpointError, load_checkpoint, load_network_weights, save_or_explain
from medkd.engines import iteration_losses
from medkd.features import unwrap

__all__ = [
    "loss_terms",
    "student_totals",
    "EpochLossTerms",
    "ProgressBar",
    "BestCheckpoints",
    "ResumeCheckpoint",
    "LoadNetworks",
    "skip_empty_batches",
    "SkippedFilesReport",
    "MetricsHistory",
]


def loss_terms(output: dict | list[dict]) -> dict[str, float | torch.Tensor]:
    """Output transform giving every loss term of a ``DistillationTrainer`` iteration, for MONAI's
    ``StatsHandler`` / ``TensorBoardStatsHandler`` (which log each key of a dict)."""
    return dict(iteration_losses(output))


def student_totals(output: dict | list[dict]) -> dict[str, float]:
    """Each student's total loss as a float, for the progress bar."""
    return {k.split("/")[0]: float(v) for k, v in iteration_losses(output).items() if k.endswith("/total")}


class EpochLossTerms:
    """Average every loss term over the epoch into ``engine.state.metrics["loss/<term>"]``.

    MONAI's ``StatsHandler``, ``TensorBoardStatsHandler`` and ``MLFlowHandler`` then log them with the metrics.
    With a trainer that does not decollate, the terms are summed on the device and read once per epoch (no
    per-iteration host sync).
    """

    def attach(self, engine: Engine) -> None:
        """Register the accumulation and the epoch summary on ``engine``."""
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._accumulate)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._summarise)

    def _reset(self, engine: Engine) -> None:
        self._sums: dict[str, torch.Tensor | float] = defaultdict(float)
        self._count = 0

    def _accumulate(self, engine: Engine) -> None:
        for name, value in iteration_losses(engine.state.output).items():
            self._sums[name] = self._sums[name] + (value.float() if isinstance(value, torch.Tensor) else value)
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
    """Keep the best checkpoint of each network by its own validation metric.

    Attach to the validation evaluator. Whenever ``metrics[f"{metric_prefix}_{name}"]`` improves, network ``name``
    is written atomically to ``{save_dir}/{name}.pt`` as ``{name: state_dict, "metric": value, "epoch": epoch}``.
    Only rank 0 writes. The best values so far are part of :meth:`state_dict`, so a resumed run
    (:class:`ResumeCheckpoint`) does not overwrite a better checkpoint with a worse one.

    Args:
        save_dir: checkpoint folder.
        networks: networks by name (DDP-wrapped networks are saved unwrapped).
        metric_prefix: metric name prefix, e.g. ``"val_mean_dice"`` or ``"val_auc"``.
    """

    def __init__(self, save_dir: str, networks: dict[str, torch.nn.Module], metric_prefix: str) -> None:
        self.save_dir = Path(save_dir)
        self.networks = networks
        self.metric_prefix = metric_prefix
        self.best: dict[str, float] = {}

    def attach(self, engine: Engine) -> None:
        """Check the metrics after each evaluation of ``engine``."""
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        for name, network in self.networks.items():
            value = engine.state.metrics.get(f"{self.metric_prefix}_{name}")
            if value is None or value <= self.best.get(name, float("-inf")):
                continue
            self.best[name] = float(value)
            if idist.get_rank() == 0:
                state = {name: unwrap(network).state_dict(), "metric": float(value), "epoch": engine.state.epoch}
                save_or_explain(state, self.save_dir / f"{name}.pt")

    def state_dict(self) -> dict:
        """The best metric of each network so far."""
        return {"best": dict(self.best)}

    def load_state_dict(self, state: dict) -> None:
        """Restore the best metrics (from a resume checkpoint)."""
        self.best = dict(state["best"])


class ResumeCheckpoint:
    """Save everything needed to resume training, and resume from it when the same command is run again.

    Every ``interval`` epochs, rank 0 writes ``{save_dir}/{filename}`` atomically (temporary file, then rename)
    with the engine state (epoch, iteration), and, for a :class:`~medkd.engines.DistillationTrainer`, every
    student, its optimizer, the feature-route adapters and the AMP scaler; for MONAI's ``SupervisedTrainer``, the
    network and its optimizer; plus ``extra`` stateful objects (e.g. :class:`BestCheckpoints`). At
    ``Events.STARTED``, if the file exists and ``resume`` is true, all of it is loaded and training continues from
    the saved epoch. A corrupt or mismatched file stops the run with an error naming it.

    Args:
        save_dir: checkpoint folder.
        filename: name of the resume checkpoint.
        interval: epochs between saves.
        resume: load the checkpoint when present.
        extra: more objects with ``state_dict``/``load_state_dict``, by name.
    """

    def __init__(
        self,
        save_dir: str,
        filename: str = "last.pt",
        interval: int = 1,
        resume: bool = True,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.path = Path(save_dir) / filename
        self.interval = interval
        self.resume = resume
        self.extra = dict(extra or {})

    def attach(self, engine: Engine) -> None:
        """Resume at ``STARTED``, save at ``EPOCH_COMPLETED`` (list it after the validation handler)."""
        engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self.save)

    def objects(self, engine: Engine) -> dict[str, Any]:
        """The objects saved and restored, by name."""
        objects: dict[str, Any] = {"engine": engine, **self.extra}
        if hasattr(engine, "students"):
            objects["routes"] = engine.routes
            for name, student in engine.students.items():
                objects[f"student_{name}"] = unwrap(student)
                objects[f"optimizer_{name}"] = engine.optimizers[name]
        else:
            objects["network"] = unwrap(engine.network)
            objects["optimizer"] = engine.optimizer
        if getattr(engine, "scaler", None) is not None:
            objects["scaler"] = engine.scaler
        return objects

    def save(self, engine: Engine) -> None:
        """Write the resume checkpoint (rank 0 only)."""
        if idist.get_rank() == 0:
            save_or_explain({k: v.state_dict() for k, v in self.objects(engine).items()}, self.path)

    def load(self, engine: Engine) -> None:
        """Restore every object from the resume checkpoint, if there is one and ``resume`` is set."""
        if not (self.resume and self.path.is_file()):
            return
        checkpoint = load_checkpoint(self.path, map_location=engine.state.device)
        max_epochs = engine.state.max_epochs
        objects = self.objects(engine)
        missing = sorted(set(objects) - set(checkpoint))
        if missing:
            raise CheckpointError(
                f"resume checkpoint {self.path} lacks {missing}: it was written by another configuration "
                "(other students or routes). Delete it, point ckpt_dir elsewhere, or pass --resume False."
            )
        try:
            for name, obj in objects.items():
                obj.load_state_dict(checkpoint[name])
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(
                f"resume checkpoint {self.path} does not match this configuration ({name}: {e}). Delete it, point "
                "ckpt_dir elsewhere, or pass --resume False."
            ) from e
        if engine.state.epoch > max_epochs:
            raise CheckpointError(
                f"resume checkpoint {self.path} is at epoch {engine.state.epoch}, beyond max_epochs={max_epochs}."
            )
        engine.state.max_epochs = max_epochs
        done = " (training already complete)" if engine.state.epoch == max_epochs else ""
        logging.getLogger("medkd").info(
            "resumed from %s at epoch %d of %d%s", self.path, engine.state.epoch, max_epochs, done
        )


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


class MetricsHistory:
    """Write the metrics of every evaluation to a CSV file (one row per epoch), for curves and comparisons.

    Attach to the validation evaluator. Rows of epochs at or after the current one are replaced, so a resumed or
    restarted run leaves one row per epoch.
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def attach(self, engine: Engine) -> None:
        """Append a row after each evaluation of ``engine``."""
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        rows = []
        if self.path.is_file():
            with self.path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["epoch"]) < epoch]
        rows.append({"epoch": epoch, **{k: float(v) for k, v in engine.state.metrics.items()}})
        columns = list(dict.fromkeys(k for r in rows for k in r))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
