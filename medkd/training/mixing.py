"""Mixup and CutMix of a distillation batch: the students and the teacher see the very same mixed images.

Beyer et al. (2022, "Knowledge distillation: A good teacher is patient and consistent") find that distillation
gains most when the teacher and the students see the same, strongly augmented images, mixup or cutmix among them.
:class:`BatchMixer` mixes a batch with a shuffled copy of itself, ``x = m·x_a + (1 − m)·x_b``: mixup blends whole
images (``m = λ``), cutmix pastes a box of ``x_b`` into ``x_a`` (``m`` is 0 inside the box). The supervised loss
follows the mixing (:meth:`MixedBatch.loss`): label maps cut and pasted with the images (cutmix in segmentation) are
exact; otherwise the loss is ``λ·L(y_a) + (1 − λ)·L(y_b)``, with ``λ`` the share of ``x_a`` (cutmix: its area).

MONAI's ``MixUp`` and ``CutMix`` (``monai.transforms.regularization``) are not used: they draw one ``λ`` per sample
(so the loss above has no single ``λ``), mix label maps linearly (class indices would blend) and size cutmix boxes
for 2D only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from medkd.errors import ConfigError

__all__ = ["MIX_MODES", "MixedBatch", "BatchMixer", "check_mixing", "batch_mixer", "cutmix_box"]

MIX_MODES = ("mixup", "cutmix")


@dataclass(frozen=True)
class MixedBatch:
    """A batch as the networks see it, and the labels its supervised loss reads.

    Attributes:
        inputs: the (mixed) images.
        targets: the labels of the first share (for cutmix label maps, the maps mixed like the images).
        partner: the labels of the second share (``targets`` shuffled like the images), or ``None`` when
            ``targets`` is exact (unmixed batch, cutmix label maps).
        lam: the first share, ``λ`` in ``λ·L(targets) + (1 − λ)·L(partner)``.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    partner: torch.Tensor | None = None
    lam: float = 1.0

    def loss(self, loss_function: Callable, logits: torch.Tensor) -> torch.Tensor:
        """The supervised loss of ``logits``: ``loss_function(logits, targets)``, or ``λ·L(y_a) + (1 − λ)·L(y_b)``."""
        first = loss_function(logits, self.targets).mean()
        if self.partner is None:
            return first
        return self.lam * first + (1.0 - self.lam) * loss_function(logits, self.partner).mean()

    @property
    def route_targets(self) -> torch.Tensor:
        """The labels the routes read (class regions, class weights): ``targets``, or ``partner`` where it has the
        larger share."""
        return self.partner if self.partner is not None and self.lam < 0.5 else self.targets


def cutmix_box(shape: tuple[int, ...], lam: float, rng: np.random.Generator) -> tuple[slice, ...]:
    """A box of about ``1 − lam`` of an image of spatial ``shape`` (2D or 3D), centred at a random point and clipped
    to the image (Yun et al. 2019): each side is ``size·(1 − lam)^(1/d)``."""
    ratio = (1.0 - lam) ** (1.0 / len(shape))
    box = []
    for size in shape:
        centre, half = int(rng.integers(size)), int(round(size * ratio)) // 2
        box.append(slice(max(centre - half, 0), min(centre + half, size)))
    return tuple(box)


def _is_label_map(inputs: torch.Tensor, targets: torch.Tensor) -> bool:
    return targets.ndim == inputs.ndim and targets.shape[2:] == inputs.shape[2:]


class BatchMixer:
    """Mixup or cutmix of whole training batches, drawn from its own seeded generator.

    With probability ``prob`` a batch is mixed with a permutation of itself, ``λ ~ Beta(alpha, alpha)``; otherwise it
    is returned as it is. One ``λ`` and one box per batch; label maps (same spatial shape as the images) are cut and
    pasted with the images.

    Args:
        mode: ``"mixup"`` or ``"cutmix"``.
        alpha: the Beta distribution's parameter (1: ``λ`` uniform; small: ``λ`` near 0 or 1).
        prob: the probability that a batch is mixed.
        seed: the generator's seed (the bundle's ``seed``), so that a run is reproducible.
    """

    def __init__(self, mode: str, alpha: float = 1.0, prob: float = 1.0, seed: int = 0) -> None:
        check_mixing(mode, alpha, prob)
        self.mode, self.alpha, self.prob = mode, float(alpha), float(prob)
        self.rng = np.random.default_rng(seed)

    def state_dict(self) -> dict:
        """The generator's state, for the resume checkpoint (a resumed run mixes as an uninterrupted one)."""
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        """Restore the generator's state of :meth:`state_dict`."""
        self.rng.bit_generator.state = state["rng"]

    def settings(self) -> dict[str, str | float]:
        """``mix``, ``mix_alpha`` and ``mix_prob``, as a run fingerprint records them."""
        return {"mix": self.mode, "mix_alpha": self.alpha, "mix_prob": self.prob}

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> MixedBatch:
        """The mixed batch of ``inputs`` (``(B, C, *spatial)``) and their ``targets`` (label maps or class labels)."""
        if self.rng.random() >= self.prob:
            return MixedBatch(inputs, targets)
        lam = float(self.rng.beta(self.alpha, self.alpha))
        perm = torch.as_tensor(self.rng.permutation(inputs.shape[0]), device=inputs.device)
        if self.mode == "mixup":
            return MixedBatch(lam * inputs + (1.0 - lam) * inputs[perm], targets, targets[perm], lam)
        box = (slice(None), slice(None), *cutmix_box(tuple(inputs.shape[2:]), lam, self.rng))
        mixed = inputs.clone()
        mixed[box] = inputs[perm][box]
        if _is_label_map(inputs, targets):
            mixed_targets = targets.clone()
            mixed_targets[box] = targets[perm][box]
            return MixedBatch(mixed, mixed_targets)
        area = float(np.prod([s.stop - s.start for s in box[2:]]) / np.prod(inputs.shape[2:]))
        return MixedBatch(mixed, targets, targets[perm], 1.0 - area)


def check_mixing(mode: str | None, alpha: float = 1.0, prob: float = 1.0) -> None:
    """Raise a :class:`~medkd.errors.ConfigError` naming the key unless ``mix`` is ``None`` or one of
    :data:`MIX_MODES`, ``mix_alpha`` is positive and ``mix_prob`` is in [0, 1]."""
    if mode is not None and mode not in MIX_MODES:
        raise ConfigError(f"mix must be null (None on the command line), 'mixup' or 'cutmix', got {mode!r}.")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ConfigError(f"mix_alpha must be a positive number (the Beta distribution's parameter), got {alpha!r}.")
    if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0 <= prob <= 1:
        raise ConfigError(f"mix_prob must be a number from 0 to 1 (the share of batches mixed), got {prob!r}.")


def batch_mixer(mode: str | None, alpha: float = 1.0, prob: float = 1.0, seed: int = 0) -> BatchMixer | None:
    """A bundle's ``mixing``: the :class:`BatchMixer` of ``mix`` (``None``: no mixing), its values checked."""
    check_mixing(mode, alpha, prob)
    return BatchMixer(mode, alpha, prob, seed) if mode is not None else None
