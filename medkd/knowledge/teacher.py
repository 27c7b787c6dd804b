"""The teacher's settings and the bundles' helpers for them: its role (``teacher_mode``, :data:`TEACHER_MODES`), where
its weights start (``teacher_init``, :data:`TEACHER_INITS`), whether a run reads it, which networks are validated, its
optimizer, its checkpoint and snapshots.

Two roles: the frozen teacher is the offline one (trained first, then frozen); the online teacher is trained with the
students, in the same step, by its own supervised loss and optimizer. Either starts from a checkpoint or, online only,
from scratch. The roles themselves, which load checkpoints and step optimizers, live with the engines
(:mod:`medkd.training.teachers`).
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
from medkd.runtime.distributed import wrap_ddp

__all__ = [
    "TEACHER_MODES",
    "TEACHER_INITS",
    "check_teacher_mode",
    "check_teacher_init",
    "check_teacher_settings",
    "default_init",
    "online_optimizer",
    "validated_networks",
    "trained_teacher",
    "teacher_checkpoint",
    "check_snapshot_epochs",
]

TEACHER_MODES = ("frozen", "online")  # offline (trained first, then frozen) or trained with the students
TEACHER_INITS = ("checkpoint", "scratch")  # where the teacher's weights start from


def _check_choice(key: str, value: Any, accepted: Iterable[str]) -> None:
    accepted = tuple(accepted)
    if value not in accepted:
        raise ConfigError(f"{key} must be {' or '.join(repr(a) for a in accepted)}, got {value!r}.")


def check_teacher_mode(mode: str) -> None:
    """Raise a :class:`~medkd.errors.ConfigError` naming ``teacher_mode`` and :data:`TEACHER_MODES` unless ``mode``
    is one of them."""
    _check_choice("teacher_mode", mode, TEACHER_MODES)


def check_teacher_init(init: str) -> None:
    """Raise a :class:`~medkd.errors.ConfigError` naming ``teacher_init`` and :data:`TEACHER_INITS` unless ``init``
    is one of them."""
    _check_choice("teacher_init", init, TEACHER_INITS)


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
    check_teacher_init(init)
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
