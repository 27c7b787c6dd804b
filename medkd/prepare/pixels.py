"""Pixel work for ``prepare``: greyscale conversion, mask values to class indices, resampling to a pixel size,
tiling, and writing NIfTI (spacing in the affine) or PNG files."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from medkd.data.loading import DataError

__all__ = [
    "GREY_MODES",
    "map_mask_values",
    "read_grey",
    "resample",
    "tile_origins",
    "to_grey",
    "write_image",
]

GREY_MODES = ("L", "I", "I;16", "I;16B", "I;16L", "F")
Image.MAX_IMAGE_PIXELS = None  # microscopy images are large on purpose


def to_grey(image: Image.Image) -> tuple[Image.Image, str | None]:
    """A one-channel copy of ``image`` and what was done (``None``: it was greyscale already).

    Alpha is dropped; colour channels that are all equal (a grey image stored as RGB) keep their values; true colour
    becomes ITU-R 601 luma (Pillow's ``convert("L")``).
    """
    if image.mode in GREY_MODES:
        return image, None
    if image.mode == "1":
        return image.convert("L"), "bilevel image converted to 0/255 greyscale"
    if image.mode == "P":
        image = image.convert("RGBA")
    bands = image.getbands()
    alpha = "A" in bands
    colour = [b for b in bands if b != "A"]
    if len(colour) == 1:
        return image.getchannel(colour[0]), "alpha channel dropped"
    if image.mode not in ("RGB", "RGBA"):
        image = image.convert("RGBA" if alpha else "RGB")
        colour = ["R", "G", "B"]
    channels = [np.asarray(image.getchannel(b)) for b in colour]
    dropped = " (alpha channel dropped)" if alpha else ""
    if all(np.array_equal(channels[0], c) for c in channels[1:]):
        return Image.fromarray(channels[0]), f"grey image stored as {image.mode}: one channel kept{dropped}"
    return image.convert("RGB").convert("L"), f"colour image converted to greyscale (luma){dropped}"


def read_grey(path: str | os.PathLike, what: str = "image") -> tuple[np.ndarray, str | None]:
    """The pixels of a 2D image file as one channel (rows first), and the conversion done (see :func:`to_grey`).

    Raises:
        DataError: the file cannot be read as a 2D image.
    """
    try:
        with Image.open(path) as image:
            image.load()
            grey, note = to_grey(image)
            array = np.asarray(grey)
    except (OSError, ValueError) as e:
        raise DataError(f"{what} '{path}' cannot be read as a 2D image ({type(e).__name__}: {e}).") from e
    return array, note


def map_mask_values(mask: np.ndarray, values: list[float] | None, num_classes: int | None, snap: bool):
    """Class indices (``uint8``) of a mask and the pixels snapped, ``{value: (count, listed value)}``.

    With ``values`` (e.g. ``[0, 127, 255]``) the i-th value becomes class i, and any other value the class of the
    nearest listed value (``snap``) or an error. Without, the mask must already hold ``0..num_classes-1``.

    Raises:
        DataError: (message without the file name, which the caller adds) values that are not listed.
    """
    found, inverse = np.unique(mask, return_inverse=True)
    if values is None:
        bad = found[(found < 0) | (found != np.round(found)) | (found >= (num_classes or 256))]
        if bad.size:
            raise DataError(
                f"holds values {found[:10].tolist()} that are not class indices 0..{(num_classes or 256) - 1}; "
                f"give the value of each class in order with --mask-values (e.g. --mask-values "
                f"{','.join(str(v) for v in found[:10].tolist())})"
            )
        return mask.astype(np.uint8), {}
    listed = np.asarray(values, dtype=np.float64)
    nearest = np.abs(found.astype(np.float64)[:, None] - listed[None, :]).argmin(axis=1)
    exact = np.isin(found, listed)
    if not snap and not exact.all():
        raise DataError(
            f"holds values {found[~exact][:10].tolist()} not in --mask-values {values}; fix the mask, or leave out "
            "--no-snap to map them to the nearest listed value"
        )
    counts = np.bincount(inverse.ravel(), minlength=len(found))
    snapped = {_number(v): (int(counts[k]), values[nearest[k]]) for k, v in enumerate(found) if not exact[k]}
    return nearest.astype(np.uint8)[inverse.reshape(mask.shape)], snapped


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)


def resample(
    image: np.ndarray, mask: np.ndarray | None, scale: tuple[float, float], num_classes: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Resize ``image`` (rows, columns) by ``scale`` (x: columns, y: rows), bilinear with antialiasing; ``mask``
    by the same, one class at a time (bilinear, then the most likely class), which keeps thin structures better
    than nearest neighbour and never invents a class value."""
    rows, cols = image.shape[:2]
    size = (max(1, round(cols * scale[0])), max(1, round(rows * scale[1])))
    if size == (cols, rows):
        return image, mask
    if image.dtype == np.uint8:
        out = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
    else:
        out = np.asarray(Image.fromarray(image.astype(np.float32)).resize(size, Image.Resampling.BILINEAR))
    if mask is None:
        return out, None
    best = np.zeros(out.shape, np.float32) - 1
    labels = np.zeros(out.shape, np.uint8)
    for c in range(num_classes):
        layer = Image.fromarray((mask == c).astype(np.float32)).resize(size, Image.Resampling.BILINEAR)
        layer = np.asarray(layer)
        better = layer > best
        labels[better], best[better] = c, layer[better]
    return out, labels


def central_span(length: int, size: int | None) -> tuple[int, int]:
    """Start and end of the central ``size`` pixels of an axis of ``length`` (the whole axis when ``size`` is None or
    not smaller)."""
    if size is None or length <= size:
        return 0, length
    start = (length - size) // 2
    return start, start + size


def tile_origins(length: int, tile: int, overlap: int) -> list[int]:
    """Start positions of tiles of ``tile`` pixels along an axis of ``length``, ``overlap`` pixels apart at least;
    the last tile ends at the border (a shorter axis gives one tile, the whole axis)."""
    if length <= tile:
        return [0]
    step = max(1, tile - overlap)
    starts = list(range(0, length - tile + 1, step))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


NIFTI_UNITS = {"m": "meter", "mm": "mm", "um": "micron", "µm": "micron", "micron": "micron", "micrometre": "micron"}


def write_image(
    path: Path, array: np.ndarray, spacing: tuple[float, float], origin: tuple[float, float], unit: str | None = None
) -> Path:
    """Write a 2D array (rows, columns) as NIfTI (``.nii.gz``: spacing and origin in the affine, columns on the first
    axis like MONAI's PNG reader, ``unit`` such as ``um`` in the header) or PNG (no spacing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".png"):
        Image.fromarray(array).save(path)
        return path
    affine = np.diag([spacing[0], spacing[1], 1.0, 1.0])
    affine[:2, 3] = origin
    image = nib.Nifti1Image(np.ascontiguousarray(array.T), affine)
    if unit and unit.lower() in NIFTI_UNITS:
        image.header.set_xyzt_units(NIFTI_UNITS[unit.lower()])
    nib.save(image, str(path))
    return path
