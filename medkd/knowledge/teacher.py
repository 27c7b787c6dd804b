"""The teacher's part in a distillation step: its network, how it is prepared, and its outputs for each batch.

Two roles (``teacher_mode``, :data:`TEACHER_MODES`): :class:`FrozenTeacher` is the offline teacher (trained first,
then frozen); :class:`OnlineTeacher` is trained with the students, in the same step, by its own supervised loss and
optimizer. Either starts from a checkpoint or, online only, from scratch (``teacher_init``, :data:`TEACHER_INITS`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from medkd.bundles import TEACHER, TEACHER_CHECKPOINT, snapshot_file
from medkd.errors import ConfigError
from medkd.knowledge.teacher_cache import TeacherCache
from medkd.runtime.distributed import unwrap, wrap_ddp
from medkd.training.checkpoints import check_trained_data, check_trained_inputs, load_network_weights

__all__ = [
    "TEACHER_MODES",
    "TEACHER_INITS",
    "Teacher",
    "FrozenTeacher",
    "OnlineTeacher",
    "make_teacher",
    "check_teacher_mode",
    "check_teacher_settings",
    "default_init",
    "start_checkpoint",
    "online_optimizer",
    "validated_networks",
    "trained_teacher",
    "teacher_checkpoint",
    "check_snapshot_epochs",
]

TEACHER_MODES = ("frozen", "online")  # offline (trained first, then frozen) or trained with the students
TEACHER_INITS = ("checkpoint", "scratch")  # where the teacher's weights start from


class Teacher:
    """What a :class:`~medkd.training.engines.DistillationTrainer` asks of a teacher.

    Attributes:
        network: the teacher network (on the trainer's device after :meth:`to`).
        optimizer: the teacher's optimizer when it is trained in the distillation step (an online teacher), stepped
            by the trainer with the students' ones; ``None`` for a teacher that is not trained.
    """

    network: nn.Module
    optimizer: Optimizer | None = None

    def to(self, device: str | torch.device) -> Teacher:
        """Put the network on ``device``; returns ``self``."""
        self.network.to(device)
        return self

    def __call__(
        self, inputs: torch.Tensor, batchdata: Any = None, pop_features: Callable[[], dict] = dict
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The teacher's ``(logits, feature maps by layer)`` for a batch of ``inputs`` (``batchdata`` is the batch
        as the data loader gave it); ``pop_features()`` gives the feature maps hooked during a forward of
        :attr:`network`."""
        raise NotImplementedError

    def checkpoint_objects(self) -> dict[str, Any]:
        """What a resume checkpoint must hold for this teacher, by name (objects with ``state_dict``)."""
        return {}


class FrozenTeacher(Teacher):
    """The offline teacher: its weights loaded once, frozen (eval mode, no gradients), run under ``no_grad``.

    Args:
        network: the teacher network.
        checkpoint: optional path of its weights (see :func:`medkd.training.checkpoints.load_network_weights`).
        cache: optional :class:`~medkd.knowledge.teacher_cache.TeacherCache` reusing its outputs across epochs when its
            inputs are deterministic; the first hit is checked against a recomputed forward (``verify=True``).
        device: device of the network (and of the loaded weights).
    """

    def __init__(
        self,
        network: nn.Module,
        checkpoint: str | None = None,
        cache: TeacherCache | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if checkpoint:
            load_network_weights(network, checkpoint, map_location=device, role="teacher")
        self.network = network.to(device).eval().requires_grad_(False)
        self.cache = cache

    def __call__(
        self, inputs: torch.Tensor, batchdata: Any = None, pop_features: Callable[[], dict] = dict
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cache = self.cache
        cached = cache.get(batchdata, inputs.device) if cache is not None else None
        if cached is not None and cached[0].shape[0] != inputs.shape[0]:
            cached = None  # sample ids that do not match the batch (e.g. metadata not collated per sample)
        if cached is not None and not cache.needs_verification:
            return cached
        with torch.no_grad():
            logits = self.network(inputs)
        features = pop_features()
        if cached is not None:  # first hit: the cached outputs must equal the recomputed ones
            cache.verify(cached, (logits, features), batchdata)
        elif cache is not None:
            cache.put(batchdata, logits, features)
        return logits, features


class OnlineTeacher(Teacher):
    """The online teacher: trained with the students, in the same step, by its own supervised loss.

    It runs in train mode with gradients; the trainer adds its supervised loss (``"teacher/sup"``, also its
    ``"teacher/total"``) to the step's loss and steps :attr:`optimizer` with the students' optimizers. Routes from
    the teacher detach its outputs (inside every route kind), so the students' terms send no gradient into it; no
    route may target it (see :class:`medkd.knowledge.routes.KnowledgeRoutes`). A teacher cache does not apply: its
    outputs change every step.

    Args:
        network: the teacher network; wrapped in ``DistributedDataParallel`` when the students are (multi-process
            training), or its copies would drift apart.
        optimizer: the teacher's optimizer, over ``network``'s parameters (e.g. the bundle's one ``optimizer``
            definition called on them).
        checkpoint: optional path of the weights to start from (see
            :func:`medkd.training.checkpoints.load_network_weights`); ``None`` starts from the network's initialisation.
        device: device of the network (and of the loaded weights).
    """

    def __init__(
        self,
        network: nn.Module,
        optimizer: Optimizer,
        checkpoint: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        owned = {id(p) for p in network.parameters()}
        if not any(id(p) in owned for group in optimizer.param_groups for p in group["params"]):
            raise ConfigError(
                "the online teacher's optimizer holds none of the teacher network's parameters: make it from "
                "that network's parameters (e.g. `$@optimizer(@teacher.parameters())`)."
            )
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed and torch.distributed.get_world_size() > 1 and unwrap(network) is network:
            raise ConfigError(
                "an online teacher in multi-process training must be wrapped in DistributedDataParallel like the "
                "students (medkd.runtime.distributed.wrap_ddp; multi_gpu_train.json does it for teacher_mode "
                "'online'), or its copies would drift apart."
            )
        if checkpoint:
            load_network_weights(network, checkpoint, map_location=device, role="teacher")
        self.network = network.to(device)
        self.optimizer = optimizer

    def __call__(
        self, inputs: torch.Tensor, batchdata: Any = None, pop_features: Callable[[], dict] = dict
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.network.train()
        logits = self.network(inputs)
        return logits, pop_features()

    def checkpoint_objects(self) -> dict[str, Any]:
        """``"teacher"`` (the network, unwrapped from DDP) and ``"optimizer_teacher"``."""
        return {TEACHER: unwrap(self.network), f"optimizer_{TEACHER}": self.optimizer}


def _check_choice(key: str, value: Any, accepted: Iterable[str]) -> None:
    accepted = tuple(accepted)
    if value not in accepted:
        raise ConfigError(f"{key} must be {' or '.join(repr(a) for a in accepted)}, got {value!r}.")


def check_teacher_mode(mode: str) -> None:
    """Raise a :class:`~medkd.errors.ConfigError` naming ``teacher_mode`` and :data:`TEACHER_MODES` unless ``mode``
    is one of them."""
    _check_choice("teacher_mode", mode, TEACHER_MODES)


def make_teacher(
    network: nn.Module,
    mode: str = "frozen",
    checkpoint: str | os.PathLike | None = None,
    optimizer: Optimizer | None = None,
    cache: TeacherCache | None = None,
    device: str | torch.device = "cpu",
) -> Teacher:
    """The :class:`Teacher` of ``mode`` (``teacher_mode``: ``"frozen"`` or ``"online"``) for ``network``.

    Args:
        network: the teacher network.
        mode: ``"frozen"`` (:class:`FrozenTeacher`) or ``"online"`` (:class:`OnlineTeacher`).
        checkpoint: optional path of the weights to start from.
        optimizer: the online teacher's optimizer; required online, refused frozen.
        cache: a frozen teacher's :class:`~medkd.knowledge.teacher_cache.TeacherCache`; refused online.
        device: device of the network.

    Raises:
        ConfigError: an unknown mode, or an optimizer or cache that the mode does not take.
    """
    check_teacher_mode(mode)
    if mode == "frozen":
        if optimizer is not None:
            raise ConfigError("a teacher optimizer was given, but teacher_mode 'frozen' does not train the teacher.")
        return FrozenTeacher(network, checkpoint, cache, device=device)
    if cache is not None:
        raise ConfigError(
            "teacher_mode 'online' cannot use a teacher cache: the online teacher's outputs change every step."
        )
    if optimizer is None:
        raise ConfigError("teacher_mode 'online' trains the teacher: give the teacher optimizer (teacher_optimizer).")
    return OnlineTeacher(network, optimizer, checkpoint, device=device)


def check_teacher_settings(
    mode: str,
    init: str,
    checkpoint: str | os.PathLike | None = None,
    written: Iterable[str | os.PathLike] = (),
) -> None:
    """Check a bundle's ``teacher_mode`` and ``teacher_init`` before anything runs.

    Args:
        mode: ``teacher_mode``, one of :data:`TEACHER_MODES`.
        init: ``teacher_init``, one of :data:`TEACHER_INITS`; a frozen teacher needs ``"checkpoint"``.
        checkpoint: ``teacher_ckpt``, the file an initialisation from ``"checkpoint"`` reads.
        written: the files the run writes (e.g. ``BestCheckpoints.paths()``): an online teacher's start checkpoint
            must not be among them, or its best checkpoint would replace it.

    Raises:
        ConfigError: naming the key, its accepted values, or the clash.
    """
    check_teacher_mode(mode)
    _check_choice("teacher_init", init, TEACHER_INITS)
    if mode == "frozen" and init == "scratch":
        raise ConfigError(
            "teacher_init 'scratch' needs teacher_mode 'online': a frozen teacher that was never trained would "
            "teach its random outputs."
        )
    if mode == "online" and init == "checkpoint" and checkpoint is not None:
        start = Path(checkpoint).expanduser().resolve()
        if any(Path(p).expanduser().resolve() == start for p in written):
            raise ConfigError(
                f"teacher_ckpt {checkpoint} is also where this run saves the online teacher's best checkpoint, which "
                "would replace it. Give the run its own folder (--ckpt_dir ...) and --teacher_ckpt the trained "
                "teacher's file, or start from scratch (--teacher_init scratch)."
            )


def default_init(mode: str) -> str:
    """The ``teacher_init`` a ``teacher_mode`` implies: a frozen teacher starts from its checkpoint, an online one
    from scratch."""
    check_teacher_mode(mode)
    return "checkpoint" if mode == "frozen" else "scratch"


def start_checkpoint(
    checkpoint: str | os.PathLike,
    init: str,
    inputs: Mapping[str, Any] | None = None,
    read: bool = True,
    training: Iterable[Mapping[str, Any]] | None = None,
    allow_other_data: bool = False,
) -> str | os.PathLike | None:
    """The checkpoint the teacher's weights are loaded from: ``checkpoint`` when ``init`` is ``"checkpoint"``, else
    ``None`` (a teacher trained from scratch). Where the run reads the teacher (``read``, :func:`teacher_is_read`), a
    checkpoint trained on other inputs than ``inputs`` (the run's
    :func:`~medkd.training.run_fingerprint.input_settings`) stops the run
    (:func:`~medkd.training.checkpoints.check_trained_inputs`), and so does one trained on other images than
    ``training`` (the run's training list), unless ``allow_other_data`` (``allow_other_teacher_data``;
    :func:`~medkd.training.checkpoints.check_trained_data`)."""
    _check_choice("teacher_init", init, TEACHER_INITS)
    chosen = checkpoint if init == "checkpoint" else None
    if inputs is not None and read:
        check_trained_inputs({TEACHER: chosen}, inputs)
    if training is not None and read:
        check_trained_data(chosen, training, allow_other_data)
    return chosen


def teacher_is_read(mode: str, routes: Iterable[Any]) -> bool:
    """Whether a distillation uses its teacher: an online teacher trains with the students; a frozen one only where
    a route takes knowledge from it (not in the ``student`` and ``dml`` presets)."""
    check_teacher_mode(mode)
    return mode == "online" or any(route.source == TEACHER for route in routes)


def online_optimizer(mode: str, optimizer: Callable[..., Optimizer], teacher: nn.Module) -> Optimizer | None:
    """The optimizer of an online teacher (``optimizer``, the bundle's one definition, over its parameters), or
    ``None`` for a frozen teacher, which no optimizer steps."""
    check_teacher_mode(mode)
    return optimizer(teacher.parameters()) if mode == "online" else None


def validated_networks(mode: str, teacher: nn.Module, students: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """The networks validated during the distillation: the students, and an online teacher first (a frozen teacher
    was validated in its own stage)."""
    check_teacher_mode(mode)
    return {TEACHER: teacher, **students} if mode == "online" else dict(students)


def trained_teacher(
    mode: str, teacher: nn.Module, device: torch.device | str, channels_last: bool = False
) -> nn.Module:
    """The teacher a multi-process run trains: an online teacher wrapped in ``DistributedDataParallel`` like the
    students (its copies would drift apart otherwise; ``channels_last`` as in :func:`wrap_ddp`); a frozen teacher as
    it is (replicated)."""
    check_teacher_mode(mode)
    if mode == "online":
        return wrap_ddp({TEACHER: teacher}, device, channels_last=channels_last)[TEACHER]
    return teacher


def _is_epoch(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_snapshot_epochs(epochs: Iterable[int]) -> list[int]:
    """``teacher_snapshots``, the teacher stage's epochs whose weights are kept beside the best checkpoint, checked
    (positive integers; a :class:`~medkd.errors.ConfigError` otherwise) and sorted."""
    if isinstance(epochs, (str, bytes)) or not isinstance(epochs, Iterable) or not all(map(_is_epoch, epochs)):
        raise ConfigError(
            f"teacher_snapshots must be a list of epochs (integers from 1), e.g. '[10, 20]', got {epochs!r}."
        )
    return sorted(set(epochs))


def teacher_checkpoint(ckpt_dir: str | os.PathLike, epoch: int | None = None) -> str:
    """A bundle's ``teacher_ckpt``: the teacher stage's best checkpoint in ``ckpt_dir``, or with ``teacher_epoch``
    its snapshot of that epoch (``teacher_epoch10.pt``, kept by ``teacher_snapshots``), an early-stopped teacher."""
    if epoch is not None and not _is_epoch(epoch):
        raise ConfigError(
            f"teacher_epoch must be null (None on the command line) or an epoch of teacher_snapshots, got {epoch!r}."
        )
    return str(Path(ckpt_dir) / (TEACHER_CHECKPOINT if epoch is None else snapshot_file(TEACHER, epoch)))
