"""The planned preprocessing and augmentation as MONAI transforms.

* :class:`NormalizeIntensityd`: the plan's ``normalization`` (``ct``, ``zscore``, ``percentile`` or ``minmax``; one
  scheme for every channel, or one per channel).
* :func:`augmentations`: the plan's augmentation keys (``flip_axes``, ``rot90_axes``, ``rotate_degrees``,
  ``scale_range``, ``intensity_augmentation``) as a list of MONAI random transforms.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    MapTransform,
    NormalizeIntensity,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandRotate90d,
    RandScaleIntensityd,
    ScaleIntensity,
    ScaleIntensityRange,
    ScaleIntensityRangePercentiles,
)

from medkd.errors import ConfigError

__all__ = ["NormalizeIntensityd", "normalizer", "augmentations", "SCHEMES"]

SCHEMES = ("ct", "zscore", "percentile", "minmax")


def normalizer(spec: Mapping[str, Any]) -> Any:
    """The MONAI array transform of one normalisation ``spec``:

    * ``{"scheme": "ct", "clip": [lo, hi], "mean": m, "std": s}``: clip to ``[lo, hi]``, then ``(x - m) / s``;
    * ``{"scheme": "zscore"}``: per image and channel, ``(x - mean) / std``;
    * ``{"scheme": "percentile", "lower": 0.5, "upper": 99.5}``: per image (all channels together), the
      percentiles to [0, 1], clipped;
    * ``{"scheme": "minmax"}``: per image (all channels together), min-max to [0, 1].

    A list of specs, one per channel, normalises each channel on its own (:class:`NormalizeIntensityd`).
    """
    if not isinstance(spec, Mapping) or spec.get("scheme") not in SCHEMES:
        raise ConfigError(
            f"normalization {spec!r} is not one of the schemes {list(SCHEMES)}; e.g. --normalization "
            "\"{'scheme': 'zscore'}\" or \"{'scheme': 'ct', 'clip': [-1000, 1000], 'mean': 0, 'std': 500}\"."
        )
    scheme = spec["scheme"]
    if scheme == "ct":
        try:
            lo, hi = (float(v) for v in spec["clip"])
            mean, std = float(spec["mean"]), float(spec["std"])
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(
                f"normalization {dict(spec)!r}: the ct scheme needs 'clip' [low, high], 'mean' and 'std' numbers."
            ) from e
        if not hi > lo or not std > 0:
            raise ConfigError(f"normalization {dict(spec)!r}: needs clip low < high and std > 0.")
        return ScaleIntensityRange(lo, hi, (lo - mean) / std, (hi - mean) / std, clip=True)
    if scheme == "zscore":
        return NormalizeIntensity(nonzero=False, channel_wise=True)
    if scheme == "percentile":
        lower, upper = float(spec.get("lower", 0.5)), float(spec.get("upper", 99.5))
        return ScaleIntensityRangePercentiles(lower, upper, 0.0, 1.0, clip=True)
    return ScaleIntensity(minv=0.0, maxv=1.0)


class NormalizeIntensityd(MapTransform):
    """Normalise the intensities of ``keys`` as the plan says (see :func:`normalizer`).

    Args:
        keys: image keys.
        normalization: one scheme for every channel (a dict), or a list of one per channel.
    """

    def __init__(
        self, keys: KeysCollection, normalization: Mapping | Sequence[Mapping], allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        specs = [normalization] if isinstance(normalization, Mapping) else list(normalization or [])
        if not specs:
            raise ConfigError("normalization is empty; give a scheme, e.g. --normalization \"{'scheme': 'zscore'}\".")
        self.per_channel = not isinstance(normalization, Mapping)
        self.transforms = [normalizer(s) for s in specs]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if not self.per_channel:
                d[key] = self.transforms[0](image)
                continue
            if len(self.transforms) != image.shape[0]:
                raise ConfigError(
                    f"normalization lists {len(self.transforms)} schemes but the image has {image.shape[0]} channels; "
                    "give one scheme per channel, or one for all."
                )
            channels = [t(image[c : c + 1]) for c, t in enumerate(self.transforms)]
            if isinstance(image, torch.Tensor):
                d[key] = torch.cat([torch.as_tensor(c) for c in channels], 0)
            else:
                d[key] = np.concatenate([np.asarray(c) for c in channels], 0)
        return d


def _radians(degrees: float | Sequence[float], spatial_dims: int) -> Any:
    if isinstance(degrees, Sequence) and not isinstance(degrees, str):
        values = [math.radians(float(v)) for v in degrees]
        return values[0] if spatial_dims == 2 else values
    value = math.radians(float(degrees))
    return value if spatial_dims == 2 else [value] * spatial_dims


def augmentations(
    keys: KeysCollection,
    spatial_dims: int,
    flip_axes: Sequence[int] | None = None,
    rot90_axes: Sequence[int] | None = None,
    rotate_degrees: float | Sequence[float] = 0.0,
    scale_range: float = 0.0,
    intensity: bool = False,
    mode: str | Sequence[str] = "bilinear",
    image_key: str = "image",
    prob: float = 0.2,
) -> list:
    """The planned augmentation, in this order:

    * ``RandFlipd`` (probability 0.5) for each axis of ``flip_axes`` (none across the axis separating lateral
      classes: the plan leaves it out);
    * ``RandRotate90d`` (probability 0.5, k in 1..3) in the plane ``rot90_axes``, if given;
    * ``RandAffined`` (probability ``prob``) with rotations up to ``rotate_degrees`` (one number, or one per axis in
      3D) and scaling by 1 ± ``scale_range``, if either is non-zero; ``mode`` per key (``nearest`` for labels);
    * with ``intensity``, on ``image_key``: Gaussian noise (0.1), Gaussian smoothing (0.2), brightness
      (x 0.75-1.25, 0.15) and gamma contrast (0.7-1.5, 0.15) with these probabilities, as nnU-Net does.
    """
    keys = [keys] if isinstance(keys, str) else list(keys)
    out: list = [RandFlipd(keys, prob=0.5, spatial_axis=int(axis)) for axis in (flip_axes or [])]
    if rot90_axes:
        out.append(RandRotate90d(keys, prob=0.5, spatial_axes=tuple(int(a) for a in rot90_axes)))
    rotating = any(float(v) for v in (rotate_degrees if isinstance(rotate_degrees, Sequence) else [rotate_degrees]))
    if rotating or float(scale_range or 0):
        out.append(
            RandAffined(
                keys,
                prob=prob,
                rotate_range=_radians(rotate_degrees, spatial_dims) if rotating else None,
                scale_range=[float(scale_range)] * spatial_dims if float(scale_range or 0) else None,
                mode=mode,
                padding_mode="zeros",
            )
        )
    if intensity:
        sigma = (0.5, 1.0)
        out += [
            RandGaussianNoised(image_key, prob=0.1, std=0.1),
            RandGaussianSmoothd(image_key, sigma_x=sigma, sigma_y=sigma, sigma_z=sigma, prob=0.2),
            RandScaleIntensityd(image_key, factors=0.25, prob=0.15),
            RandAdjustContrastd(image_key, prob=0.15, gamma=(0.7, 1.5)),
        ]
    return out
