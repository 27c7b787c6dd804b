"""The paths bundle JSON names (``$medkd.training.distributed.default_device()`` and the like in ``train.json`` and
``multi_gpu_train.json``): the functions live in :mod:`medkd.runtime.devices` and :mod:`medkd.runtime.distributed`;
medkd's code imports them from there."""

from __future__ import annotations

from medkd.runtime.devices import default_backend, default_device, local_device
from medkd.runtime.distributed import (
    destroy_process_group,
    init_process_group,
    is_not_rank0,
    train_sampler,
    wrap_ddp,
)

__all__ = [
    "default_device",
    "local_device",
    "default_backend",
    "init_process_group",
    "destroy_process_group",
    "is_not_rank0",
    "train_sampler",
    "wrap_ddp",
]
