"""Reuse the frozen teacher's outputs across epochs when its inputs do not change."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from monai.data import MetaTensor

__all__ = ["TeacherCache", "sample_ids_from_meta"]


def sample_ids_from_meta(batchdata: Any, key: str = "image") -> list[str] | None:
    """Per-sample ids of a batch: the source file names in the image's MONAI metadata (``None`` if absent)."""
    image = batchdata.get(key) if isinstance(batchdata, dict) else None
    names = getattr(image, "meta", {}).get("filename_or_obj")
    if names is None:
        return None
    return [str(n) for n in names] if isinstance(names, (list, tuple)) else [str(names)]


def _plain(x: torch.Tensor, storage: torch.device) -> torch.Tensor:
    x = x.detach().to(storage)
    return x.as_tensor() if isinstance(x, MetaTensor) else x


class TeacherCache:
    """Per-sample store of teacher logits and feature maps.

    Only valid when the teacher sees the same input for a sample at every epoch: no random augmentation before
    the network (deterministic preprocessing, or augmentation applied after). Outputs are kept on ``storage``
    (CPU by default) and moved back to the training device on a hit. A batch is served from the cache only if all
    its samples are in it.

    Args:
        sample_ids: maps a batch to one id per sample; default: file names from MONAI metadata.
        storage: device holding the cache.
    """

    def __init__(
        self, sample_ids: Callable[[Any], list[str] | None] = sample_ids_from_meta, storage: str = "cpu"
    ) -> None:
        self.sample_ids = sample_ids
        self.storage = torch.device(storage)
        self._logits: dict[str, torch.Tensor] = {}
        self._features: dict[str, dict[str, torch.Tensor]] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._logits)

    def get(self, batchdata: Any, device: str | torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """Teacher ``(logits, features)`` of the batch, or ``None`` when any sample is not cached."""
        ids = self.sample_ids(batchdata)
        if not ids or any(i not in self._logits for i in ids):
            self.misses += 1
            return None
        self.hits += 1
        logits = torch.stack([self._logits[i] for i in ids]).to(device, non_blocking=True)
        layers = self._features[ids[0]].keys()
        features = {k: torch.stack([self._features[i][k] for i in ids]).to(device, non_blocking=True) for k in layers}
        return logits, features

    def put(self, batchdata: Any, logits: torch.Tensor, features: dict[str, torch.Tensor]) -> None:
        """Store the teacher outputs of each sample of the batch."""
        ids = self.sample_ids(batchdata)
        if not ids:
            return
        for b, i in enumerate(ids):
            self._logits[i] = _plain(logits[b], self.storage)
            self._features[i] = {k: _plain(v[b], self.storage) for k, v in features.items()}
