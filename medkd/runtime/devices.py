"""Devices: the device a bundle runs on (``--device``, checked before any work), a ``torchrun`` process's device and
its process-group backend."""

from __future__ import annotations

import os
from typing import Any

import torch

from medkd.errors import ConfigError

__all__ = ["default_device", "local_device", "default_backend", "check_device"]


def default_device() -> torch.device:
    """``cuda:0`` when a GPU is visible, else the CPU (a bundle's ``device``)."""
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def local_device() -> torch.device:
    """The GPU of this ``torchrun`` process (``cuda:<LOCAL_RANK>``), or the CPU when no GPU is visible."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def default_backend() -> str:
    """The process-group backend: ``nccl`` when a GPU is visible, else ``gloo`` (CPU)."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def check_device(device: Any, key: str = "device") -> None:
    """Raise :class:`ConfigError` when ``device`` (e.g. ``--device cuda``) names a GPU that this torch cannot use: a
    torch built without CUDA, no GPU visible, or a GPU index past the last one."""
    if isinstance(device, str) and device.startswith(("$", "@")):
        return  # an expression: the bundle evaluates it
    try:
        wanted = torch.device(device) if isinstance(device, str | torch.device) else None
    except RuntimeError as e:
        raise ConfigError(f"--{key} {device!r} is not a device: use cpu, cuda or cuda:N.") from e
    if wanted is None or wanted.type != "cuda":
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count and (wanted.index is None or wanted.index < count):
        return
    if torch.version.cuda is None:
        why = f"this torch ({torch.__version__}) is built without CUDA; install a CUDA build of torch, or"
    elif not count:
        why = "no GPU is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES), or"
    else:
        why = f"there are {count} GPU(s), cuda:0..cuda:{count - 1}; pick one of them, or"
    raise ConfigError(f"--{key} {device}: {why} leave --{key} out to run on the CPU.")
