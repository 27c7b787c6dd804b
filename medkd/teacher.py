"""The teacher's part in a distillation step: its network, how it is prepared, and its outputs for each batch.

:class:`FrozenTeacher` is the offline teacher (trained first, then frozen); an online teacher, trained with the
students, is another :class:`Teacher` with the same interface.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from medkd.checkpoints import load_network_weights
from medkd.teacher_cache import TeacherCache

__all__ = ["Teacher", "FrozenTeacher"]


class Teacher:
    """What a :class:`~medkd.engines.DistillationTrainer` asks of a teacher.

    Attributes:
        network: the teacher network (on the trainer's device after :meth:`to`).
    """

    network: nn.Module

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
        checkpoint: optional path of its weights (see :func:`medkd.checkpoints.load_network_weights`).
        cache: optional :class:`~medkd.teacher_cache.TeacherCache` reusing its outputs across epochs when its
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
