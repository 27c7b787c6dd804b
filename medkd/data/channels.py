"""Pictures (PNG, JPEG, BMP, 2D DICOM) with the channel count the networks take.

A folder of pictures often mixes greyscale, greyscale with alpha, RGB and RGBA files (one export in a hundred saved
differently), which a batch cannot stack. :class:`MatchChannelsd` turns each picture into the bundle's
``in_channels``, 1 (greyscale) or 3 (RGB), the way image viewers do; a 2D DICOM image is a picture too (its samples
are colours). Volumes (NIfTI, DICOM series, NumPy) and cases of several files are left as they are, since their
channels are modalities (the bundles' checks name a mismatch there).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import ImageMetaKey

from medkd.data.formats import reader_kind, suffix_kind

__all__ = ["MatchChannelsd", "is_picture", "match_channels", "picture_channels"]

logger = logging.getLogger(__name__)

LUMINANCE = (0.299, 0.587, 0.114)  # ITU-R BT.601, as Pillow's convert("L")


def is_picture(path: Any, spatial_dims: int = 2) -> bool:
    """Whether ``path`` is one picture (not a list of files): a PNG, JPEG or BMP file, or the DICOM file of a 2D image
    (``spatial_dims`` 2), whose samples are colours (ultrasound, photographs, slides), never modalities."""
    if not isinstance(path, str | os.PathLike):
        return False
    if suffix_kind(path) == "pil":
        return True
    return spatial_dims == 2 and Path(path).is_file() and reader_kind(path, check_exists=False) == "dicom"


def picture_channels(channels: int) -> int:
    """The channels a picture of ``channels`` holds but its alpha: 1 for greyscale (+ alpha), 3 for RGB (+ alpha)."""
    return {2: 1, 4: 3}.get(channels, channels)


def match_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    """A channel-first picture ``(C, H, W)`` with ``channels`` channels: its alpha dropped, RGB to greyscale by
    luminance (``channels`` 1), greyscale repeated (``channels`` 3); other counts as they are.

    Shapes: ``(C, *spatial)`` -> ``(channels, *spatial)`` where C is 1-4 and ``channels`` is 1 or 3."""
    colour = image[: picture_channels(image.shape[0])]
    if colour.shape[0] == channels or channels not in (1, 3) or colour.shape[0] not in (1, 3):
        return colour
    if channels == 3:
        return colour.repeat(3, *([1] * (colour.ndim - 1)))
    weights = torch.tensor(LUMINANCE, dtype=torch.float32).view(3, *([1] * (colour.ndim - 1)))
    return (colour.float() * weights).sum(0, keepdim=True)


class MatchChannelsd(MapTransform):
    """Give each picture of ``keys`` (:func:`is_picture`, by its metadata's file name: PNG, JPEG, BMP or a 2D DICOM
    file) ``channels`` channels with :func:`match_channels`; other images pass unchanged. Place it right after the
    loader (channel first)."""

    def __init__(self, keys: KeysCollection, channels: int, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.channels = int(channels)
        self._told: set[int] = set()  # the channel counts converted so far, each logged once

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            path = getattr(image, "meta", {}).get(ImageMetaKey.FILENAME_OR_OBJ)
            if image.shape[0] == self.channels or not is_picture(path, image.ndim - 1):
                continue
            d[key] = match_channels(image, self.channels)
            if image.shape[0] not in self._told and picture_channels(image.shape[0]) != self.channels:
                self._told.add(image.shape[0])
                logger.warning(
                    "pictures of %d channels are converted to the networks' %d (in_channels) as they load, e.g. %s",
                    image.shape[0],
                    self.channels,
                    path,
                )
        return d
