"""Non-finite (NaN/Inf) guards: input images, training losses and network outputs.

* Input images: :mod:`medkd.data.finite` (``check-data``'s counts, :class:`~medkd.data.finite.CheckFinited` after
  loading).
* :class:`NonFiniteLoss` is the one ``nan_policy`` of the training stages (``raise``, ``skip`` or ``ignore``):
  :class:`medkd.training.engines.DistillationTrainer` uses it, and so does MONAI's ``SupervisedTrainer`` (the teacher
  stage) among its handlers.
* :class:`NonFiniteOutputs` stops an evaluator when an input or a network's output is non-finite, naming the image
  and the network, instead of letting ``argmax`` turn NaN logits into an empty mask or a lower Dice.

A non-finite *training loss* raises :class:`NonFiniteLossError`, a ``FloatingPointError`` and deliberately not a
:class:`~medkd.errors.MedkdError`: a diverging run (learning rate, AMP overflow, a bug in a custom loss) is not
necessarily a mistake in the user's input, so the traceback is kept. Non-finite *inputs* are user errors
(:class:`~medkd.data.loading.DataError`), and so are non-finite *outputs* of a finite input at evaluation or
inference (:class:`NonFiniteOutputError`): the checkpoint holds NaN/Inf weights or the chosen AMP dtype overflows,
both fixed by the user.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from monai.utils import ImageMetaKey
from monai.utils.enums import CommonKeys as Keys

from medkd.bundles import checkpoint_file
from medkd.data.finite import count_nonfinite, nonfinite_message
from medkd.data.loading import DataError
from medkd.errors import ConfigError, MedkdError

__all__ = [
    "NAN_POLICIES",
    "NonFiniteLoss",
    "NonFiniteLossError",
    "NonFiniteOutputError",
    "NonFiniteOutputs",
]

NAN_POLICIES = ("raise", "skip", "ignore")


class NonFiniteLossError(FloatingPointError):
    """A training loss is NaN/Inf (``nan_policy="raise"``); the message names the epoch, iteration and batch files."""


class NonFiniteOutputError(MedkdError, FloatingPointError):
    """A network gave NaN/Inf for a finite input at evaluation or inference; the message names the image, the
    network and what to do."""


def _filenames(data: Any, n: int) -> list[str]:
    """The ``n`` file names of a batched MetaTensor, or placeholders when its metadata has none."""
    meta = getattr(data, "meta", None)
    names = meta.get(ImageMetaKey.FILENAME_OR_OBJ) if isinstance(meta, Mapping) else None
    if isinstance(names, list | tuple) and len(names) == n:
        return [str(x) for x in names]
    return [f"sample {i} of the batch" for i in range(n)]


def _nonfinite_samples(batch: Any) -> list[int]:
    """Indices along the first (batch) axis of the samples holding NaN/Inf."""
    if not isinstance(batch, torch.Tensor) or not batch.is_floating_point() or batch.ndim == 0:
        return []
    data = batch.as_tensor() if hasattr(batch, "as_tensor") else batch
    ok = torch.isfinite(data).reshape(data.shape[0], -1).all(dim=1)
    return [] if bool(ok.all()) else torch.nonzero(~ok).flatten().tolist()


class NonFiniteLoss:
    """The one ``nan_policy`` of medkd's training stages: :class:`medkd.training.engines.DistillationTrainer` makes
    one from its ``nan_policy``; the teacher stage (MONAI's ``SupervisedTrainer``) has one among its handlers.

    Attach it as one of the trainer's handlers. After each loss (``IterationEvents.LOSS_COMPLETED``):

    * ``"raise"``: a NaN/Inf loss stops training with :class:`NonFiniteLossError` naming the epoch, iteration, the
      non-finite loss terms (with ``terms``) and the batch's files (those whose input is non-finite first);
    * ``"skip"``: the step is skipped with a warning: after the backward pass the gradients are dropped
      (``zero_grad(set_to_none=True)``, so the optimizers leave every parameter and their state alone; with an
      enabled AMP ``GradScaler`` they are set to NaN instead so that the scaler skips the step), and the networks'
      buffers (BatchNorm running statistics, updated by the forward passes) are restored;
    * ``"ignore"``: no check (and no host synchronisation).

    With gradient accumulation, a skipped step also drops the gradients accumulated before it in that window.
    Under DDP every process takes the same decision (the flag is reduced across processes).

    Args:
        nan_policy: ``"raise"``, ``"skip"`` or ``"ignore"``.
        terms: key of the engine output holding the loss terms by name (``DistillationTrainer``'s ``"losses"``), to
            name the non-finite ones; ``None`` for an engine without.
    """

    def __init__(self, nan_policy: str = "raise", terms: str | None = None) -> None:
        if nan_policy not in NAN_POLICIES:
            raise ConfigError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}; e.g. --nan_policy skip.")
        self.nan_policy = nan_policy
        self.terms = terms
        self.skipped = 0
        self._skip = False
        self._saved: list[torch.Tensor] = []

    def attach(self, engine: Engine) -> None:
        """Check the loss of each iteration of ``engine`` (a ``SupervisedTrainer`` or a ``DistillationTrainer``)."""
        if self.nan_policy == "ignore":
            return
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self._check)
        if self.nan_policy == "skip":
            engine.add_event_handler(Events.ITERATION_STARTED, self._save_buffers)
            engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self._drop_step)

    def _save_buffers(self, engine: Engine) -> None:
        buffers = _buffers(engine)
        if len(self._saved) != len(buffers) or any(
            s.shape != b.shape or s.device != b.device for s, b in zip(self._saved, buffers, strict=True)
        ):
            self._saved = [b.detach().clone() for b in buffers]
            return
        for saved, buffer in zip(self._saved, buffers, strict=True):
            saved.copy_(buffer.detach())

    def _check(self, engine: Engine) -> None:
        loss = engine.state.output[Keys.LOSS]
        finite = torch.isfinite(loss.detach()).all() if isinstance(loss, torch.Tensor) else torch.tensor(True)
        if idist.get_world_size() > 1:
            finite = idist.all_reduce(finite.to(torch.int32), op="MIN") > 0
        self._skip = not bool(finite)
        if not self._skip:
            return
        value = float(loss.detach().float().mean()) if isinstance(loss, torch.Tensor) else loss
        where = f"epoch {engine.state.epoch}, iteration {engine.state.iteration}"
        terms = self._bad_terms(engine.state.output)
        batch = _batch_files(engine.state.output.get(Keys.IMAGE))
        if self.nan_policy == "raise":
            raise NonFiniteLossError(
                f"non-finite loss ({value}) at {where}{f': {terms}' if terms else ''}{f' ({batch})' if batch else ''}. "
                "Lower the learning rate or that term's weight, check the input images (`python -m medkd "
                "check-data --datalist ...`), or set nan_policy to 'skip' (--nan_policy skip) to skip such steps."
            )
        self.skipped += 1
        detail = "".join(f"; {x}" for x in (terms, batch) if x)
        warnings.warn(f"skipping the step at {where}: non-finite loss ({value}){detail}.", stacklevel=2)

    def _bad_terms(self, output: Mapping) -> str:
        """The non-finite loss terms of ``output``, e.g. ``"sp/sup=nan, sp/total=nan"``; empty without ``terms``."""
        terms = output.get(self.terms, {}) if self.terms is not None else {}
        return ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items() if not bool(torch.isfinite(v).all()))

    def _drop_step(self, engine: Engine) -> None:
        if not self._skip:
            return
        scaler = getattr(engine, "scaler", None)
        nan_for_scaler = getattr(engine, "amp", False) and scaler is not None and scaler.is_enabled()
        for optimizer in _optimizers(engine):
            if not nan_for_scaler:
                optimizer.zero_grad(set_to_none=True)
                continue
            for group in optimizer.param_groups:  # the scaler finds NaN and skips the step
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.fill_(float("nan"))
        with torch.no_grad():
            for saved, buffer in zip(self._saved, _buffers(engine), strict=False):
                buffer.copy_(saved)


def _buffers(engine: Engine) -> list[torch.Tensor]:
    """The buffers a training step's forward passes may update: those of a ``DistillationTrainer``'s networks and
    route adapters, or of a ``SupervisedTrainer``'s network."""
    networks = getattr(engine, "networks", None)
    modules = [*networks.values(), engine.routes] if networks is not None else [engine.network]
    return [buffer for module in modules for buffer in module.buffers()]


def _optimizers(engine: Engine) -> list[torch.optim.Optimizer]:
    """The optimizers a training step steps: a ``DistillationTrainer``'s trained ones, or a ``SupervisedTrainer``'s."""
    trained = getattr(engine, "trained_optimizers", None)
    return list(trained.values()) if trained is not None else [engine.optimizer]


def _batch_files(images: Any) -> str:
    """The files of a batch for a message: those with non-finite input, else the first four; empty without names."""
    n = int(images.shape[0]) if isinstance(images, torch.Tensor) and images.ndim else 0
    files = _filenames(images, n) if n else []
    bad = [files[i] for i in _nonfinite_samples(images)] if n else []
    shown = ", ".join(files[:4]) + (f" and {len(files) - 4} more" if len(files) > 4 else "")
    return f"non-finite input in {', '.join(bad)}" if bad else f"batch: {shown}" if shown else ""


class NonFiniteOutputs:
    """Stop an evaluator when a batch's image or a network's output holds NaN/Inf, naming the file and network.

    Attach to a ``SupervisedEvaluator`` (output ``pred``, named ``network_name``) or a
    :class:`medkd.training.evaluators.MultiNetworkEvaluator` (``pred_<network>``). It runs at
    ``IterationEvents.FORWARD_COMPLETED``, before postprocessing (``argmax`` would hide NaN logits).

    Raises:
        DataError: an input image is non-finite (add :class:`~medkd.data.finite.CheckFinited` after loading to
            name the file earlier).
        NonFiniteOutputError: a network gave NaN/Inf for a finite image.
    """

    def __init__(self, network_name: str | None = None, ckpt_dir: str | None = None) -> None:
        self.network_name = network_name
        self.ckpt_dir = ckpt_dir

    def attach(self, engine: Engine) -> None:
        """Check each batch of ``engine`` after the forward passes."""
        engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        if not isinstance(output, Mapping):
            return
        images = output.get(Keys.IMAGE)
        if not isinstance(images, torch.Tensor) or images.ndim == 0:
            return
        files = _filenames(images, int(images.shape[0]))
        bad = _nonfinite_samples(images)
        if bad:
            count = count_nonfinite(images[bad[0]])
            what = f"Image '{files[bad[0]]}' (after preprocessing)"
            raise DataError(nonfinite_message(what, count, images[0].numel()) + ".")
        for key, value in output.items():
            if not (key == Keys.PRED or str(key).startswith(f"{Keys.PRED}_")):
                continue
            name = str(key)[len(Keys.PRED) + 1 :] if key != Keys.PRED else self.network_name or "the network"
            bad = _nonfinite_samples(value)
            if bad:
                ckpt = f"{self.ckpt_dir}/{checkpoint_file(name)}" if self.ckpt_dir else "its checkpoint"
                raise NonFiniteOutputError(
                    f"network '{name}' gave non-finite output (NaN or Inf) for image '{files[bad[0]]}', whose input "
                    f"is finite: its weights ({ckpt}) hold NaN/Inf (a diverged training run: retrain it, with "
                    "--nan_policy raise) or the computation overflowed (with --amp True, try --amp False)."
                )
