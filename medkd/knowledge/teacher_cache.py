"""Reuse the frozen teacher's outputs across epochs when its inputs do not change."""

from __future__ import annotations

import warnings
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
    x = x.detach().to(storage, copy=True)  # a copy: no view of the batch (or of a tensor changed later) is kept
    return x.as_tensor() if isinstance(x, MetaTensor) else x


def _relative_error(cached: torch.Tensor, fresh: torch.Tensor) -> float:
    cached, fresh = cached.float(), fresh.float()
    return float((cached - fresh).abs().mean() / fresh.abs().mean().clamp_min(1e-12))


class TeacherCache:
    """Per-sample store of teacher logits and feature maps.

    Only valid when the teacher sees the same input for a sample at every epoch: no random augmentation before
    the network (deterministic preprocessing, or augmentation applied after). Outputs are kept on ``storage``
    (CPU by default) and moved back to the training device on a hit. A batch is served from the cache only if all
    its samples are in it; a batch whose ids repeat (several crops of one file) is never cached.

    With ``verify`` (default), the first batch served from the cache is also recomputed by the teacher (the
    ``DistillationTrainer`` does this) and compared: if the cached outputs differ (random augmentation before the
    teacher, a teacher that changed), the cache warns, empties itself and stays off, so training goes on with fresh
    teacher outputs.

    Args:
        sample_ids: maps a batch to one id per sample; default: file names from MONAI metadata
            (``batch["image"].meta["filename_or_obj"]``, as ``CacheDataset`` + ``DataLoader`` give them).
        storage: device holding the cache.
        verify: check the first hit against a recomputed teacher output.
        tolerance: largest mean absolute difference, relative to the mean magnitude, that ``verify`` accepts.
    """

    def __init__(
        self,
        sample_ids: Callable[[Any], list[str] | None] = sample_ids_from_meta,
        storage: str = "cpu",
        verify: bool = True,
        tolerance: float = 1e-2,
    ) -> None:
        self.sample_ids = sample_ids
        self.storage = torch.device(storage)
        self.tolerance = tolerance
        self.needs_verification = verify
        self.enabled = True
        self._logits: dict[str, torch.Tensor] = {}
        self._features: dict[str, dict[str, torch.Tensor]] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._logits)

    def _ids(self, batchdata: Any) -> list[str] | None:
        ids = self.sample_ids(batchdata) if self.enabled else None
        if not ids or len(set(ids)) != len(ids):
            return None
        return ids

    def get(self, batchdata: Any, device: str | torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """Teacher ``(logits, features)`` of the batch, or ``None`` when any sample is not cached."""
        ids = self._ids(batchdata)
        if ids is None or any(i not in self._logits for i in ids):
            self.misses += 1
            return None
        self.hits += 1
        logits = torch.stack([self._logits[i] for i in ids]).to(device, non_blocking=True)
        layers = self._features[ids[0]].keys()
        features = {k: torch.stack([self._features[i][k] for i in ids]).to(device, non_blocking=True) for k in layers}
        return logits, features

    def put(self, batchdata: Any, logits: torch.Tensor, features: dict[str, torch.Tensor]) -> None:
        """Store the teacher outputs of each sample of the batch."""
        ids = self._ids(batchdata)
        if ids is None or len(ids) != logits.shape[0]:
            return
        for b, i in enumerate(ids):
            self._logits[i] = _plain(logits[b], self.storage)
            self._features[i] = {k: _plain(v[b], self.storage) for k, v in features.items()}

    def verify(
        self,
        cached: tuple[torch.Tensor, dict[str, torch.Tensor]],
        fresh: tuple[torch.Tensor, dict[str, torch.Tensor]],
        batchdata: Any = None,
    ) -> bool:
        """Compare a cache hit with the recomputed teacher outputs; on a mismatch warn, empty and disable the cache."""
        self.needs_verification = False
        pairs = [("logits", cached[0], fresh[0])]
        pairs += [(f"feature {k}", cached[1][k], v) for k, v in fresh[1].items() if k in cached[1]]
        errors = {name: _relative_error(c, f) for name, c, f in pairs}
        bad = {name: e for name, e in errors.items() if not e <= self.tolerance}
        if not bad and set(cached[1]) == set(fresh[1]):
            return True
        ids = self.sample_ids(batchdata) if batchdata is not None else None
        warnings.warn(
            f"TeacherCache: cached teacher outputs of {ids[:4] if ids else 'a batch'} differ from recomputed ones "
            f"(relative errors {bad or 'feature layers differ'}, tolerance {self.tolerance}): the teacher's inputs "
            "change between epochs (random augmentation before the network?). The cache is emptied and turned off.",
            stacklevel=2,
        )
        self.clear()
        self.enabled = False
        return False

    def clear(self) -> None:
        """Forget every stored output."""
        self._logits.clear()
        self._features.clear()
