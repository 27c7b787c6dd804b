"""Multi-process training helpers: wrap students in DistributedDataParallel (the teacher is only replicated)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["wrap_ddp", "is_not_rank0"]


def wrap_ddp(
    networks: Mapping[str, nn.Module], device: torch.device | str, sync_batchnorm: bool = True
) -> dict[str, nn.Module]:
    """Each network moved to ``device`` and wrapped in ``DistributedDataParallel``.

    On CUDA, batch norms become ``SyncBatchNorm`` (when ``sync_batchnorm``) so running statistics agree across
    processes; on CPU (gloo) ``SyncBatchNorm`` is not available and DDP broadcasts rank 0's buffers at each forward.
    Parameters stay identical across processes either way.
    """
    device = torch.device(device)
    wrapped = {}
    for name, net in networks.items():
        if device.type == "cuda":
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net) if sync_batchnorm else net
            wrapped[name] = DistributedDataParallel(net.to(device), device_ids=[device])
        else:
            wrapped[name] = DistributedDataParallel(net.to(device))
    return wrapped


def is_not_rank0() -> bool:
    """True in every process but the first of an initialised process group (handlers that write use it)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() > 0
