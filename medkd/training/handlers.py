"""Handlers for distillation runs: loss-term logging, progress, best and resume checkpoints, metrics history."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar as _IgniteProgressBar
from monai.handlers import MLFlowHandler

from medkd.bundles import checkpoint_file, snapshot_file
from medkd.knowledge.routes import Route
from medkd.knowledge.teacher import check_snapshot_epochs
from medkd.runtime.distributed import unwrap
from medkd.runtime.files import CheckpointError, load_checkpoint, write_settings
from medkd.training.checkpoints import load_network_weights, save_or_explain
from medkd.training.engines import iteration_losses
from medkd.training.evaluators import metric_name
from medkd.training.previous import keep_previous
from medkd.training.random_states import DataPass, RandomStates
from medkd.training.run_fingerprint import fingerprint_changes

__all__ = [
    "loss_terms",
    "student_totals",
    "EpochLossTerms",
    "tracking_params",
    "TrackedSettings",
    "ProgressBar",
    "BestCheckpoints",
    "EpochSnapshots",
    "FinalValidation",
    "ResumeCheckpoint",
    "LoadNetworks",
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


def tracking_params(settings: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``settings`` as MLflow parameters: nested mappings flattened into ``"<key>/<sub-key>"`` names, a list of
    :class:`~medkd.knowledge.routes.Route` into one mapping per route by its name (a route's weight is
    ``"<key>/sp/prediction_from_teacher/weight"``), every other value as JSON text (strings as they are)."""
    params: dict[str, str] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, Sequence) and value and all(isinstance(r, Route) for r in value):
            value = {r.name: {k: v for k, v in r.to_dict().items() if k not in ("source", "target")} for r in value}
        if isinstance(value, Mapping):
            params.update(tracking_params(value, f"{name}/"))
        else:
            params[name] = value if isinstance(value, str) else json.dumps(value, default=str)
    return params


def _mlflow_handlers(engine: Engine) -> list[MLFlowHandler]:
    """The ``MLFlowHandler``s attached to ``engine``: ignite keeps no list of handlers but its table of events, in
    which each registered its bound ``start`` at ``STARTED``."""
    owners = (getattr(handler, "__self__", None) for handler, *_ in engine._event_handlers[Events.STARTED])
    return list({id(o): o for o in owners if isinstance(o, MLFlowHandler)}.values())


class TrackedSettings:
    """Give the run's settings and files to MONAI's ``MLFlowHandler`` of the same engine (``--tracking mlflow``),
    which logs them as parameters (its ``experiment_param``, :func:`tracking_params` of ``params``) when the run starts
    and as artifacts (beside the executed config MONAI saves) when it completes. Without tracking it does nothing.

    List it in the trainer's handlers: ``--tracking mlflow`` appends its handler after them, so this one's
    ``STARTED`` comes first.

    Args:
        params: the settings to log, e.g. the routes, loss weights, temperature, seed and planned settings.
        artifacts: files (or folders) to log; those missing when the run completes are skipped.
    """

    def __init__(self, params: Mapping[str, Any], artifacts: Sequence[str | os.PathLike] = ()) -> None:
        self.params = tracking_params(params)
        self.artifacts = tuple(str(p) for p in artifacts)

    def attach(self, engine: Engine) -> None:
        """Hand the settings over at ``STARTED`` of ``engine``."""
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        for tracker in _mlflow_handlers(engine):
            tracker.experiment_param = {**(tracker.experiment_param or {}), **self.params}
            tracker.artifacts = (*tracker.artifacts, *self.artifacts)


class ProgressBar(_IgniteProgressBar):
    """tqdm progress bar over the iterations of each epoch, showing every student's total loss."""

    def __init__(self, persist: bool = False, **tqdm_kwargs) -> None:
        super().__init__(persist=persist, **tqdm_kwargs)

    def attach(self, engine: Engine) -> None:  # type: ignore[override]
        """Attach to ``engine`` (MONAI calls ``attach(engine)`` on every handler of a workflow)."""
        super().attach(engine, output_transform=student_totals)


class BestCheckpoints:
    """Keep the best checkpoint of each network by its own validation metric.

    Attach to the validation evaluator. Whenever ``metrics[metric_name(metric, name)]`` (e.g. ``val_mean_dice_sp``,
    see :func:`medkd.training.evaluators.metric_name`) improves (non-finite values
    never count), network ``name`` is written atomically to ``{save_dir}/{name}.pt`` as
    ``{name: state_dict, "metric": value, "epoch": epoch, "fingerprint": fingerprint}``. Only rank 0 writes. The best
    values so far are part of :meth:`state_dict`, so a resumed run (:class:`ResumeCheckpoint`) does not overwrite a
    better checkpoint with a worse one; a fresh start moves the old files aside (give :meth:`paths` to
    :class:`ResumeCheckpoint`'s ``set_aside``). Scores of names not in ``networks`` are not checkpointed: the
    students' ensemble (``val_mean_dice_ensemble``, see :func:`medkd.training.evaluators.ensemble_members`) has no
    weights.

    Args:
        save_dir: checkpoint folder.
        networks: networks by name (DDP-wrapped networks are saved unwrapped).
        metric: the metric that ranks checkpoints, e.g. ``"mean_dice"`` or ``"auc"``.
        fingerprint: the run's fingerprint (:func:`medkd.training.run_fingerprint.run_fingerprint`), stored in every
            file.
    """

    def __init__(
        self,
        save_dir: str,
        networks: dict[str, torch.nn.Module],
        metric: str,
        fingerprint: dict | None = None,
    ) -> None:
        self.save_dir = Path(save_dir)
        self.networks = networks
        self.metric = metric
        self.fingerprint = fingerprint
        self.best: dict[str, float] = {}

    def attach(self, engine: Engine) -> None:
        """Check the metrics after each evaluation of ``engine``."""
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def paths(self) -> list[Path]:
        """The files this handler writes, one per network."""
        return [self.save_dir / checkpoint_file(name) for name in self.networks]

    def missing(self) -> list[str]:
        """The networks without a best checkpoint yet."""
        return [name for name in self.networks if name not in self.best]

    def __call__(self, engine: Engine) -> None:
        for name, network in self.networks.items():
            value = engine.state.metrics.get(metric_name(self.metric, name))
            if value is None or not math.isfinite(value) or value <= self.best.get(name, float("-inf")):
                continue
            self.best[name] = float(value)
            if idist.get_rank() == 0:
                state = {name: unwrap(network).state_dict(), "metric": float(value), "epoch": engine.state.epoch}
                if self.fingerprint is not None:
                    state["fingerprint"] = self.fingerprint
                save_or_explain(state, self.save_dir / checkpoint_file(name))

    def state_dict(self) -> dict:
        """The best metric of each network so far."""
        return {"best": dict(self.best)}

    def load_state_dict(self, state: dict) -> None:
        """Restore the best metrics (from a resume checkpoint)."""
        self.best = dict(state["best"])


class EpochSnapshots:
    """Keep each network's weights at chosen epochs, e.g. an early-stopped teacher to distil from.

    Attach to the trainer. After each epoch of ``epochs``, rank 0 writes ``{save_dir}/{name}_epoch{epoch}.pt``
    (:func:`medkd.bundles.snapshot_file`) atomically, with the records of a best checkpoint
    (:class:`BestCheckpoints`): ``{name: state_dict, "epoch": epoch, "fingerprint": fingerprint}``, so that a run
    reading it checks its inputs the same way. Give :meth:`paths` to :class:`ResumeCheckpoint`'s ``set_aside``.

    Args:
        save_dir: checkpoint folder.
        networks: networks by name (DDP-wrapped networks are saved unwrapped).
        epochs: the epochs to keep (checked by :func:`medkd.knowledge.teacher.check_snapshot_epochs`).
        fingerprint: the run's fingerprint, stored in every file.
    """

    def __init__(
        self,
        save_dir: str,
        networks: dict[str, torch.nn.Module],
        epochs: Sequence[int] = (),
        fingerprint: dict | None = None,
    ) -> None:
        self.save_dir = Path(save_dir)
        self.networks = networks
        self.epochs = check_snapshot_epochs(epochs)
        self.fingerprint = fingerprint

    def attach(self, engine: Engine) -> None:
        """Save at each ``EPOCH_COMPLETED`` of ``epochs`` (list it before :class:`ResumeCheckpoint`)."""
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def paths(self) -> list[Path]:
        """The files this handler writes, one per network and epoch."""
        return [self.save_dir / snapshot_file(name, epoch) for name in self.networks for epoch in self.epochs]

    def __call__(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        if epoch not in self.epochs or idist.get_rank() != 0:
            return
        for name, network in self.networks.items():
            state = {name: unwrap(network).state_dict(), "epoch": epoch}
            if self.fingerprint is not None:
                state["fingerprint"] = self.fingerprint
            save_or_explain(state, self.save_dir / snapshot_file(name, epoch))


class FinalValidation:
    """Validate after the last epoch when ``val_interval`` does not divide ``max_epochs`` (MONAI's
    ``ValidationHandler`` validates every ``interval`` epochs only), so every run ends validated and with a best
    checkpoint; then warn about any network of ``best`` still without one.

    List it in the trainer's handlers after the ``ValidationHandler`` and before :class:`ResumeCheckpoint` (which
    saves that epoch).

    Args:
        validator: the validation evaluator.
        interval: the ``ValidationHandler``'s interval, in epochs.
        best: the :class:`BestCheckpoints` of the validator, to check at the end of training.
    """

    def __init__(self, validator: Any, interval: int = 1, best: BestCheckpoints | None = None) -> None:
        self.validator = validator
        self.interval = interval
        self.best = best

    def attach(self, engine: Engine) -> None:
        """Validate at the last ``EPOCH_COMPLETED`` of ``engine``; check the best checkpoints at ``COMPLETED``."""
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.validate_last)
        engine.add_event_handler(Events.COMPLETED, self.check_best)

    def validate_last(self, engine: Engine) -> None:
        """Run the validator if this is the last epoch and the ``ValidationHandler`` skipped it."""
        epoch = engine.state.epoch
        if epoch == engine.state.max_epochs and epoch % self.interval:
            self.validator.run(epoch)

    def check_best(self, engine: Engine) -> None:
        """Warn (rank 0) about networks that ended training without a best checkpoint."""
        missing = self.best.missing() if self.best is not None else []
        if missing and idist.get_rank() == 0:
            metrics = ", ".join(metric_name(self.best.metric, name) for name in missing)
            logging.getLogger("medkd").warning(
                "training ended without a best checkpoint for %s in %s: the validation metric (%s) was never a "
                "finite number. Check the validation list and the metric's name.",
                ", ".join(missing),
                self.best.save_dir,
                metrics,
            )


_RANDOM_STATES = "random_states"
_DATA_PASS = "data_pass"
_CHOICES = (
    "Its files stay as they are. To keep both runs, give this one other output folders (--ckpt_dir and --output_dir, "
    "or --bundle_root; with python -m medkd compare, another --output, or --fresh); to start over in this "
    "folder, pass --resume False (the old checkpoints and metrics history are moved aside, not deleted); to "
    "continue the old run, run it with its old settings."
)


class ResumeCheckpoint:
    """Save everything needed to resume training, and resume from it when the same command is run again.

    Every ``interval`` epochs, rank 0 writes ``{save_dir}/{filename}`` atomically (temporary file, then rename) with
    the engine state (epoch, iteration), what the trainer's ``checkpoint_objects()`` names (for a
    :class:`~medkd.training.engines.DistillationTrainer` every student, its optimizer, the routes' adapters and the AMP
    scaler; for a :class:`~medkd.training.engines.TeacherTrainer` the network, its optimizer and the scaler), ``extra``
    stateful objects (e.g. :class:`BestCheckpoints`), the random states
    (:class:`~medkd.training.random_states.RandomStates` of the engine's data loader, rank 0's in a multi-GPU run,
    and the :class:`~medkd.training.random_states.DataPass` the epoch ended in) and the run's ``fingerprint``. At
    ``Events.STARTED``, if the file exists and ``resume`` is true, all of it is loaded and training continues from
    the saved epoch, drawing the random numbers an uninterrupted run would have drawn (a file without random states,
    written by an older medkd, resumes with a warning that it does not). A corrupt or mismatched file, or one written
    by another run (its fingerprint differs, or it has none), stops the run with an error naming it and what
    changed; nothing is written.

    It also makes Ctrl-C during training leave the engine as one line saying where the run stopped, which
    checkpoint is the last and that the same command resumes (:meth:`interrupted`; see
    :class:`medkd.errors.UserErrorsFirst`).

    Otherwise the run starts afresh, and rank 0 first renames the previous run's files that exist (the resume
    checkpoint itself and those of ``set_aside``: best checkpoints, metrics history) with a timestamp, e.g. ``sp.pt``
    -> ``sp.20261126-101500.pt``, logging a warning that says where they went: a fresh start never replaces a better
    checkpoint, and a fresh run killed before its first save cannot resume the old one.

    Once the run is accepted (resumed or fresh), rank 0 writes ``settings`` to ``settings_file`` (JSON), e.g. the
    record of :func:`medkd.planning.show_plan`, so the settings that trained the checkpoints are kept beside them.

    Args:
        save_dir: checkpoint folder.
        filename: name of the resume checkpoint.
        interval: epochs between saves.
        resume: load the checkpoint when present.
        extra: more objects with ``state_dict``/``load_state_dict``, by name.
        fingerprint: the run's fingerprint (:func:`medkd.training.run_fingerprint.run_fingerprint`); ``None`` skips the
            check.
        set_aside: files to move aside on a fresh start (e.g. ``BestCheckpoints.paths()`` and the history CSV).
        settings: what to write to ``settings_file`` when the run starts (JSON-serialisable).
        settings_file: where; also moved aside on a fresh start. ``None`` writes nothing.
    """

    def __init__(
        self,
        save_dir: str,
        filename: str = "last.pt",
        interval: int = 1,
        resume: bool = True,
        extra: dict[str, Any] | None = None,
        fingerprint: dict | None = None,
        set_aside: Sequence[str | os.PathLike] = (),
        settings: Mapping[str, Any] | None = None,
        settings_file: str | os.PathLike | None = None,
    ) -> None:
        self.path = Path(save_dir) / filename
        self.interval = interval
        self.resume = resume
        self.extra = dict(extra or {})
        self.fingerprint = fingerprint
        self.set_aside = [Path(p) for p in set_aside]
        self.settings = settings
        self.settings_file = Path(settings_file) if settings_file is not None else None
        if self.settings_file is not None:
            self.set_aside.append(self.settings_file)
        self.saved_epoch: int | None = None  # the epoch of the checkpoint on disk, once saved or resumed from
        self.data_pass = DataPass()

    def attach(self, engine: Engine) -> None:
        """Resume at ``STARTED``, save at ``EPOCH_COMPLETED`` (list it after the validation handlers); become the
        engine's ``resume_checkpoint``, which words its Ctrl-C message."""
        engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self.save)
        engine.resume_checkpoint = self
        self.data_pass.attach(engine)

    def objects(self, engine: Engine) -> dict[str, Any]:
        """The objects saved and restored, by name: the engine, ``extra``, what the trainer says a checkpoint
        must hold (``checkpoint_objects()`` of :class:`~medkd.training.engines.DistillationTrainer` and
        :class:`~medkd.training.engines.TeacherTrainer`), ``random_states`` and then ``data_pass`` (restored in this
        order)."""
        return {
            "engine": engine,
            **self.extra,
            **engine.checkpoint_objects(),
            _RANDOM_STATES: RandomStates(engine.state.dataloader),
            _DATA_PASS: self.data_pass,
        }

    def interrupted(self, engine: Engine) -> KeyboardInterrupt:
        """The ``KeyboardInterrupt`` that Ctrl-C during ``engine``'s run leaves with: one line saying where it
        stopped, the last checkpoint and what to do."""
        where = f"Interrupted at epoch {engine.state.epoch} (iteration {engine.state.iteration})"
        if self.saved_epoch is not None:
            last = f"the last checkpoint is {self.path} (epoch {self.saved_epoch})"
        elif self.resume and self.path.is_file():
            last = f"the last checkpoint is {self.path}"
        else:
            return KeyboardInterrupt(
                f"{where}: no checkpoint was written yet (the first is written after epoch {self.interval}); run "
                "the same command again to start over."
            )
        return KeyboardInterrupt(f"{where}: {last}; run the same command again to resume.")

    def save(self, engine: Engine) -> None:
        """Write the resume checkpoint (rank 0 only)."""
        self.saved_epoch = engine.state.epoch
        if idist.get_rank() == 0:
            state = {k: v.state_dict() for k, v in self.objects(engine).items()}
            if self.fingerprint is not None:
                state["fingerprint"] = self.fingerprint
            save_or_explain(state, self.path)

    def start_fresh(self) -> None:
        """Move the resume checkpoint and the files of ``set_aside`` aside if they exist (rank 0 only), with a
        warning saying where."""
        if idist.get_rank() != 0:
            return
        why = "--resume False" if not self.resume else f"no {self.path.name} to resume from"
        keep_previous([self.path, *self.set_aside], f"starting afresh ({why})")

    def _check_fingerprint(self, checkpoint: dict, missing: list[str]) -> None:
        if self.fingerprint is None:
            return
        stored = checkpoint.get("fingerprint")
        if stored is not None:
            changes = fingerprint_changes(stored, self.fingerprint)
            if changes:
                listed = "".join(f"\n  - {c}" for c in changes)
                raise CheckpointError(
                    f"resume checkpoint {self.path} was written by another run; what changed:{listed}\n{_CHOICES}"
                )
        elif not missing:  # a file lacking objects is reported as such below
            raise CheckpointError(
                f"resume checkpoint {self.path} has no run fingerprint (it was written by an older medkd version), so "
                f"it cannot be told whether it is a run of this configuration. {_CHOICES}"
            )

    def load(self, engine: Engine) -> None:
        """Restore every object from the resume checkpoint, if there is one and ``resume`` is set; else start
        afresh (:meth:`start_fresh`). Then write ``settings``."""
        if not (self.resume and self.path.is_file()):
            self.start_fresh()
            self.data_pass.begin(engine)
        else:
            self._resume(engine)
        if self.settings_file is not None and idist.get_rank() == 0:
            write_settings(dict(self.settings or {}), self.settings_file, key="settings_file")

    def _resume(self, engine: Engine) -> None:
        checkpoint = load_checkpoint(self.path, map_location=engine.state.device)
        max_epochs = engine.state.max_epochs
        objects = self.objects(engine)
        if _RANDOM_STATES not in checkpoint:
            del objects[_RANDOM_STATES], objects[_DATA_PASS]
            self.data_pass.begin(engine)
        missing = sorted(set(objects) - set(checkpoint))
        self._check_fingerprint(checkpoint, missing)
        if missing:
            raise CheckpointError(
                f"resume checkpoint {self.path} lacks {missing}: it was written by another configuration "
                "(other students or routes). Delete it, point ckpt_dir elsewhere, or pass --resume False."
            )
        if _RANDOM_STATES not in objects:
            self._warn_not_identical("it holds no random states (it was written by an older medkd)")
        try:
            for name, obj in objects.items():
                lost = obj.load_state_dict(checkpoint[name])
                if name == _RANDOM_STATES and lost:
                    self._warn_not_identical(f"its random states lack {', '.join(lost)}")
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise CheckpointError(
                f"resume checkpoint {self.path} does not match this configuration ({name}: {e}). Delete it, point "
                "ckpt_dir elsewhere, or pass --resume False."
            ) from e
        if engine.state.epoch > max_epochs:
            raise CheckpointError(
                f"resume checkpoint {self.path} is at epoch {engine.state.epoch}, beyond max_epochs={max_epochs}."
            )
        engine.state.max_epochs = max_epochs
        self.saved_epoch = engine.state.epoch
        done = " (training already complete)" if engine.state.epoch == max_epochs else ""
        logging.getLogger("medkd").info(
            "resumed from %s at epoch %d of %d%s", self.path, engine.state.epoch, max_epochs, done
        )

    def _warn_not_identical(self, why: str) -> None:
        logging.getLogger("medkd").warning(
            "resuming from %s, but %s: the resumed epochs draw other random numbers (augmentation, batch order, "
            "dropout) than an uninterrupted run would, so their results are close to, not identical with, its.",
            self.path,
            why,
        )


class LoadNetworks:
    """Load ``{load_dir}/{name}.pt`` into each network when the engine starts (see
    :func:`medkd.training.checkpoints.load_network_weights`: a missing or mismatched file is named in the error).

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
            path = Path(self.load_dir) / checkpoint_file(name)
            load_network_weights(network, path, map_location=self.map_location, role=name)


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
