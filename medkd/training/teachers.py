"""The teacher's roles in a distillation step: its network, how it is prepared, and its outputs for each batch.

Two roles (``teacher_mode``, :data:`medkd.knowledge.teacher.TEACHER_MODES`): :class:`FrozenTeacher` is the offline
teacher (trained first, then frozen); :class:`OnlineTeacher` is trained with the students, in the same step, by its own
supervised loss and optimizer. Either starts from a checkpoint (:func:`start_checkpoint`) or, online only, from
scratch (``teacher_init``). The settings they take are checked in :mod:`medkd.knowledge.teacher`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from medkd.bundles import TEACHER
from medkd.errors import ConfigError
from medkd.knowledge.teacher import check_teacher_init, check_teacher_mode
from medkd.knowledge.teacher_cache import TeacherCache
from medkd.runtime.distributed import unwrap
from medkd.training.checkpoints import check_trained_data, check_trained_inputs, load_network_weights

__all__ = ["Teacher", "FrozenTeacher", "OnlineTeacher", "make_teacher", "start_checkpoint"]


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


def start_checkpoint(
    checkpoint: str | os.PathLike,
    init: str,
    inputs: Mapping[str, Any] | None = None,
    read: bool = True,
    training: Iterable[Mapping[str, Any]] | None = None,
    allow_other_data: bool = False,
) -> str | os.PathLike | None:
    """The checkpoint the teacher's weights are loaded from: ``checkpoint`` when ``init`` is ``"checkpoint"``, else
    ``None`` (a teacher trained from scratch). Where the run reads the teacher (``read``,
    :func:`medkd.knowledge.teacher.teacher_is_read`), a checkpoint trained on other inputs than ``inputs`` (the run's
    :func:`~medkd.training.run_fingerprint.input_settings`) stops the run
    (:func:`~medkd.training.checkpoints.check_trained_inputs`), and so does one trained on other images than
    ``training`` (the run's training list), unless ``allow_other_data`` (``allow_other_teacher_data``;
    :func:`~medkd.training.checkpoints.check_trained_data`)."""
    check_teacher_init(init)
    chosen = checkpoint if init == "checkpoint" else None
    if inputs is not None and read:
        check_trained_inputs({TEACHER: chosen}, inputs)
    if training is not None and read:
        check_trained_data(chosen, training, allow_other_data)
    return chosen
