"""Training data kept on the training device (MONAI's fast-training recipe), as a bundle option.

With ``data_on_device: true`` a bundle caches its loaded images where the networks run: ``CacheDataset`` keeps the
output of the deterministic loading transforms followed by ``ToDeviced``, the random augmentations then run on that
device (MONAI's transforms take CUDA tensors), and a ``ThreadDataLoader`` makes the batches in a thread beside the
training step, since device tensors cannot be sent to worker processes. On a GPU this removes the per-step copy of
every batch and the CPU augmentation from the step; on a CPU it changes only where batches are made, not what they
hold.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import DataLoader, ThreadDataLoader
from monai.transforms import ToDeviced

__all__ = ["data_loader", "on_device"]


def on_device(
    transforms: Sequence[Callable], keys: KeysCollection, device: str | torch.device, enabled: bool
) -> list[Callable]:
    """The loading ``transforms``, followed, when ``enabled``, by ``ToDeviced(keys, device)`` (the images a
    ``CacheDataset`` caches are then on ``device``)."""
    transforms = list(transforms)
    return transforms + [ToDeviced(keys=keys, device=device)] if enabled else transforms


def data_loader(dataset: Any, batch_size: int, threaded: bool = False, num_workers: int = 0, **kwargs: Any) -> Any:
    """MONAI's ``ThreadDataLoader`` when ``threaded`` (with ``num_workers=0``: batches are made in one thread
    beside the step, in the order a ``DataLoader`` makes them), else its ``DataLoader`` with ``num_workers``;
    ``kwargs`` (``shuffle``, ``sampler``, ...) go to either, but ``shuffle`` where a ``sampler`` is given (``None``
    is none): the sampler decides the order."""
    if kwargs.get("sampler") is not None:
        kwargs.pop("shuffle", None)
    if threaded:
        return ThreadDataLoader(dataset, batch_size=batch_size, num_workers=0, **kwargs)
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, **kwargs)
