"""Processes: the process group of a ``torchrun`` run, rank guards, DDP wrapping and unwrapping.

The bundles call these instead of writing conditionals in their JSON (``multi_gpu_train.json``): a process picks its
device and backend (:mod:`medkd.runtime.devices`), joins the group (:func:`init_process_group`),
writes shared files once (:func:`rank0_first`), wraps its students (:func:`wrap_ddp`; :func:`unwrap` finds the
network inside) and leaves the group (:func:`destroy_process_group`). Each is a no-op, or the single-process answer,
without a process group.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from monai.data import DistributedSampler as MonaiDistributedSampler
from monai.data import DistributedWeightedRandomSampler
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler, Sampler, WeightedRandomSampler

from medkd.runtime.layout import channels_last as to_channels_last

__all__ = [
    "init_process_group",
    "destroy_process_group",
    "is_distributed",
    "is_not_rank0",
    "rank0_first",
    "train_sampler",
    "unwrap",
    "wrap_ddp",
]


def is_distributed() -> bool:
    """Whether this process belongs to an initialised process group."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def init_process_group(backend: str, device: torch.device | str) -> None:
    """Join the process group of a ``torchrun`` run (unless already in one) and make ``device`` the current CUDA
    device when it is a GPU."""
    if not is_distributed():
        torch.distributed.init_process_group(backend=backend)
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)


def destroy_process_group() -> None:
    """Leave the process group, if this process is in one."""
    if is_distributed():
        torch.distributed.destroy_process_group()


def is_not_rank0() -> bool:
    """True in every process but the first of an initialised process group (handlers that write use it)."""
    return is_distributed() and torch.distributed.get_rank() > 0


@contextmanager
def rank0_first() -> Iterator[None]:
    """Run the ``with`` block on rank 0 first, then on the other ranks (which wait at a barrier until rank 0 is
    done): files the block writes when missing are written once, and the others find them. Every rank must enter
    the block; in a single process it just runs."""
    if is_not_rank0():
        torch.distributed.barrier()
    yield
    if is_distributed() and not is_not_rank0():
        torch.distributed.barrier()


def unwrap(network: nn.Module) -> nn.Module:
    """The network inside a ``DistributedDataParallel``/``DataParallel`` wrapper or a ``torch.compile`` module (also
    nested), or the network itself: what a checkpoint, a fingerprint or a layer name refers to."""
    while True:
        if isinstance(network, DistributedDataParallel | nn.DataParallel):
            network = network.module
        elif isinstance(getattr(network, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            network = network._orig_mod
        else:
            return network


def wrap_ddp(
    networks: Mapping[str, nn.Module],
    device: torch.device | str,
    sync_batchnorm: bool = True,
    channels_last: bool = False,
) -> dict[str, nn.Module]:
    """Each network moved to ``device`` and wrapped in ``DistributedDataParallel``.

    On CUDA, batch norms become ``SyncBatchNorm`` (when ``sync_batchnorm``) so running statistics agree across
    processes; on CPU (gloo) ``SyncBatchNorm`` is not available and DDP broadcasts rank 0's buffers at each forward.
    Parameters stay identical across processes either way. ``channels_last``: convert each network to the
    channels-last layout (:func:`medkd.runtime.layout.channels_last`) before wrapping, so that DDP's gradient
    buckets have its layout.
    """
    device = torch.device(device)
    wrapped = {}
    for name, net in networks.items():
        if channels_last:
            to_channels_last([net])
        if device.type == "cuda":
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net) if sync_batchnorm else net
            wrapped[name] = DistributedDataParallel(net.to(device), device_ids=[device])
        else:
            wrapped[name] = DistributedDataParallel(net.to(device))
    return wrapped


def train_sampler(dataset: Dataset, sampler: Sampler | None = None, **kwargs: Any) -> DistributedSampler:
    """The training sampler of one process of a ``torchrun`` run: MONAI's ``DistributedSampler`` (each process a
    shuffled share of ``dataset``), or, where the single-process ``sampler`` is a ``WeightedRandomSampler`` (e.g.
    :func:`medkd.data.balance.balanced_sampler`), MONAI's ``DistributedWeightedRandomSampler`` drawing from each
    process's share with the same weights. ``kwargs`` (``num_replicas``, ``rank``) go to the sampler."""
    if isinstance(sampler, WeightedRandomSampler):
        return DistributedWeightedRandomSampler(dataset, sampler.weights.tolist(), even_divisible=True, **kwargs)
    return MonaiDistributedSampler(dataset, even_divisible=True, shuffle=True, **kwargs)
