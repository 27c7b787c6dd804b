"""Channels-last memory layout for medkd's engines (the ``channels_last`` option of every bundle).

Converting a network's convolution weights to ``torch.channels_last`` (2D) or ``torch.channels_last_3d`` (3D) is
enough: PyTorch runs a convolution channels-last when its weight is, whatever the input's layout, and its output
stays channels-last through the network, so neither the batches nor the sliding-window inferer change. On the 2-core
CPU this made a distillation step of the 3D bundle 1.16x faster and one of the 2D bundle 1.05x, with freed memory
kept (1.09x before; ``docs/benchmarks.md``): oneDNN's convolutions on few channels at full resolution, which dominate
small students, are much faster channels-last. On a GPU it is what tensor cores want under ``amp``.

The parameters are converted in place (the same ``Parameter`` objects, so optimizers built before still hold them),
the state-dict keys and values do not change, and loading a checkpoint into a converted network keeps its layout.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["channels_last", "is_channels_last"]

_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}  # by the rank of a 2D / 3D convolution weight


def channels_last(networks: Iterable[nn.Module]) -> None:
    """Convert every 4-d (2D convolution) and 5-d (3D convolution) parameter and buffer of each network, in place, to
    the channels-last layout of its rank (a wrapped network, ``DistributedDataParallel`` or compiled, inside).
    Convert before wrapping in ``DistributedDataParallel`` (:func:`medkd.runtime.distributed.wrap_ddp` takes
    ``channels_last``), so that its gradient buckets have the layout."""
    for network in networks:
        for tensor in [*network.parameters(), *network.buffers()]:
            layout = _FORMATS.get(tensor.dim())
            if layout is not None and not tensor.is_contiguous(memory_format=layout):
                tensor.data = tensor.data.contiguous(memory_format=layout)


def is_channels_last(network: nn.Module) -> bool:
    """Whether every 4-d and 5-d parameter of ``network`` is channels-last (``False`` when it has none)."""
    weights = [p for p in network.parameters() if p.dim() in _FORMATS]
    return bool(weights) and all(p.is_contiguous(memory_format=_FORMATS[p.dim()]) for p in weights)
