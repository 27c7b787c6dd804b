"""Data fingerprint: what a dataset is made of, measured once from its datalist (nnU-Net's dataset fingerprint).

:func:`fingerprint_dataset` loads every image (and label map) of the training and validation lists the way the
bundles do (:class:`medkd.data.loading.LoadMedicalImage`, channel first, reoriented to the bundle's ``axcodes``) and
records:

* dimensionality and channels; spacing and size (median, min, max; per case at the end);
* intensity statistics per channel: percentiles 0.5 / 99.5, mean, std, min, max, over the foreground (label > 0)
  for segmentation, the whole image for classification, and whether the data look like CT (integer values in the
  Hounsfield range with a large negative minimum, or ``"modality": "CT"`` in the datalist);
* per class: the fraction of voxels (segmentation) or of samples (classification), how many images hold it, and the
  median extent of its objects (connected components) in spacing units;
* lateral classes: pairs by name (``left``/``right``, ``l``/``r``, ``lt``/``rt``, ``sinister``/``dexter`` tokens)
  and by position (their centroids lie on opposite sides of the image centre along one axis, the same way round in
  at least 90% of the images holding both), with the axis that separates them.

Everything is plain JSON (lists, numbers, strings), so the plan file is human-readable.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from monai.transforms import Orientation
from scipy import ndimage

from medkd.data.channels import is_picture, picture_channels
from medkd.data.loading import ORIENTATION_LABELS, DataError, LoadMedicalImage, drop_unit_axes
from medkd.planning.lateral import lateral_classes

__all__ = ["fingerprint_dataset", "is_ct_like"]

logger = logging.getLogger("medkd.planning")

SAMPLES_PER_CASE = 10_000  # intensity values kept per image and channel for the percentiles (as nnU-Net)
HU_MINIMUM = -500.0  # CT-like: integer values whose minimum is below this (air is -1000 HU)


def is_ct_like(integer: bool, minimum: float, modality: str | None = None) -> bool:
    """CT-like intensities: the datalist says CT, or the values are integers with a large negative minimum."""
    if modality:
        return modality.strip().upper() == "CT"
    return bool(integer) and minimum <= HU_MINIMUM


def _stats(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {}
    p_low, p_high = np.percentile(values, [0.5, 99.5])
    return {"percentile_00_5": float(p_low), "percentile_99_5": float(p_high)}


def _round(x: Any, digits: int = 4) -> Any:
    """Round floats to ``digits`` significant digits, recursively (readable plan files)."""
    if isinstance(x, float | np.floating):
        x = float(x)
        if not math.isfinite(x) or x == 0:
            return x
        return round(x, max(0, digits - 1 - int(math.floor(math.log10(abs(x))))))
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, Mapping):
        return {k: _round(v, digits) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_round(v, digits) for v in x]
    return x


def _summary(rows: Sequence[Sequence[float]]) -> dict[str, list[float]]:
    arr = np.asarray(rows, dtype=float)
    return {
        "median": np.median(arr, 0).tolist(),
        "min": arr.min(0).tolist(),
        "max": arr.max(0).tolist(),
        "percentile_10": np.percentile(arr, 10, axis=0).tolist(),
    }


def _index_table(label_values: Sequence[int]) -> np.ndarray:
    """A table from label value to class index (-1: not a class's value)."""
    table = np.full(max(label_values) + 1, -1, dtype=np.int64)
    table[np.asarray(label_values, dtype=np.int64)] = np.arange(len(label_values))
    return table


def _to_indices(lab: np.ndarray, table: np.ndarray, label: Any, warnings: list[str]) -> np.ndarray:
    """The label map ``lab`` (integral values) as class indices; values of no class become -1, counted as background
    below with a warning."""
    values = lab.astype(np.int64)
    known = (values >= 0) & (values < table.size)
    out = np.full(values.shape, -1, dtype=np.int64)
    out[known] = table[values[known]]
    if (out < 0).any():
        others = np.unique(values[out < 0])[:5].tolist()
        warnings.append(f"{label}: label values {others} are no class's value ('labels' map); counted as background")
        out[out < 0] = 0
    return out.astype(np.float64)


def _subset(items: Sequence[Any], max_cases: int | None) -> list[Any]:
    if not max_cases or len(items) <= max_cases:
        return list(items)
    index = np.linspace(0, len(items) - 1, max_cases).round().astype(int)
    return [items[i] for i in sorted(set(index.tolist()))]


def _add_region(into: tuple[dict, dict], c: int, region: np.ndarray, rng: np.random.Generator) -> None:
    """Add the values ``region`` of channel ``c`` to ``into``: up to ``SAMPLES_PER_CASE`` samples (for the
    percentiles) and the count, sum, sum of squares, minimum and maximum."""
    samples, moments = into
    pick = region if region.size <= SAMPLES_PER_CASE else rng.choice(region, SAMPLES_PER_CASE, replace=False)
    samples.setdefault(c, []).append(pick)
    m = moments.setdefault(c, [0.0, 0.0, 0.0, math.inf, -math.inf])
    m[0] += region.size
    m[1] += float(region.sum(dtype=np.float64))
    m[2] += float(np.square(region, dtype=np.float64).sum())
    m[3], m[4] = min(m[3], float(region.min())), max(m[4], float(region.max()))


class _Tally:
    """What :func:`fingerprint_dataset` adds up over the cases it reads."""

    def __init__(self, task: str, class_names: Sequence[str] | None, label_values: Sequence[int] | None, seed: int):
        self.task = task
        self.rng = np.random.default_rng(seed)
        self.dims_seen: Counter = Counter()
        self.example: dict[int, str] = {}  # the first image of each dimensionality
        self.channels_seen: Counter = Counter()
        self.pictures: Counter = Counter()  # the channels of the PNG, JPEG and BMP files, which the bundles convert
        self.sizes: list[list[int]] = []
        self.spacings: list[list[float]] = []
        self.files: list[str] = []
        self.samples: dict[int, list[np.ndarray]] = {}
        self.moments: dict[int, list[float]] = {}  # count, sum, sum of squares, min, max over the sampled region
        self.whole: dict[int, list[float]] = {}  # whole-image min, max; integral values
        self.empty: tuple[dict, dict] = ({}, {})  # samples and moments of the cases without foreground
        self.num_classes = len(class_names) if class_names else 0
        self.to_index = _index_table(label_values) if task == "segmentation" and label_values is not None else None
        self.voxels = np.zeros(max(self.num_classes, 1), dtype=np.float64)
        self.present = np.zeros(max(self.num_classes, 1), dtype=np.int64)
        self.extents: dict[int, list[list[float]]] = {}
        self.objects: dict[int, list[int]] = {}
        self.centroids: list[dict[int, list[float]]] = []
        self.warnings: list[str] = []

    def add_image(self, image: Any, path: Any) -> tuple[np.ndarray, list[float]]:
        """Count an image's dimensionality, channels, size and spacing; return its array (a picture's alpha dropped,
        as the bundles load it) and spacing."""
        array = np.asarray(image.detach().cpu().numpy() if hasattr(image, "detach") else image)
        dims = array.ndim - 1
        self.dims_seen[dims] += 1
        self.example.setdefault(dims, str(path))
        if is_picture(path, dims):
            array = array[: picture_channels(array.shape[0])]
            self.pictures[array.shape[0]] += 1
        self.channels_seen[array.shape[0]] += 1
        spacing = [float(s) for s in np.asarray(getattr(image, "pixdim", [1.0] * dims), dtype=float)[:dims]]
        self.sizes.append(list(array.shape[1:]))
        self.spacings.append(spacing)
        self.files.append(str(path))
        return array, spacing

    def _grow(self, top: int) -> None:
        if self.voxels.size < top:
            self.voxels = np.pad(self.voxels, (0, top - self.voxels.size))
            self.present = np.pad(self.present, (0, top - self.present.size))

    def add_label_map(self, lab: np.ndarray, label: Any, shape: list[int], spacing: list[float]) -> np.ndarray | None:
        """Count a label map's classes (voxels, objects, centroids); return its foreground mask, or ``None`` when
        its shape is not its image's."""
        if self.to_index is not None:
            lab = _to_indices(lab, self.to_index, label, self.warnings)
        if list(lab.shape) != shape:
            self.warnings.append(f"{label}: label shape {list(lab.shape)} differs from its image {shape}; skipped")
            return None
        top = self.num_classes or int(lab.max()) + 1
        outside = (lab < 0) | (lab >= top)
        if outside.any():
            values = np.unique(lab[outside])[:5].astype(int).tolist()
            self.warnings.append(
                f"{label}: label values {values} outside 0..{top - 1} counted as background (check-data says how to "
                "fix them)"
            )
            lab = np.where(outside, 0, lab)
        lab = lab.astype(np.uint8 if top <= 256 else np.int32)
        self._grow(top)
        self.centroids.append(_class_stats(lab, spacing, self.voxels, self.present, self.extents, self.objects))
        return lab > 0

    def add_class_index(self, index: int) -> None:
        """Count a classification sample of class ``index``."""
        self._grow(index + 1)
        self.voxels[index] += 1
        self.present[index] += 1

    def add_intensities(self, array: np.ndarray, mask: np.ndarray | None) -> None:
        """Add the foreground (``mask``, else the whole image) of each channel; a case without foreground (a
        negative case) adds to the foreground statistics nothing, its whole image is used only when no case has
        foreground."""
        into = self.empty if mask is not None and not mask.any() else (self.samples, self.moments)
        for c in range(array.shape[0]):
            channel = array[c].astype(np.float32)
            _add_region(into, c, channel[mask] if mask is not None and mask.any() else channel.ravel(), self.rng)
            probe = channel.ravel()[:: max(1, channel.size // SAMPLES_PER_CASE)]
            w = self.whole.setdefault(c, [math.inf, -math.inf, 1.0])
            w[0], w[1] = min(w[0], float(channel.min())), max(w[1], float(channel.max()))
            w[2] = w[2] and float(np.all(np.mod(probe, 1) == 0))

    def dimensions(self) -> tuple[int, int, bool]:
        """The spatial dimensions, the most common channel count and whether the bundles convert the pictures to it;
        :class:`DataError` for images of several dimensionalities."""
        if len(self.dims_seen) > 1:
            seen = ", ".join(f"{n} {d}D, e.g. {self.example[d]}" for d, n in sorted(self.dims_seen.items()))
            raise DataError(
                f"the datalist mixes images of several dimensionalities ({seen}); a bundle takes one: list 2D and 3D "
                "images in separate datalists (or convert them)."
            )
        channels = self.channels_seen
        converted = len(channels) > 1 and self.pictures == channels and set(self.pictures) <= {1, 3}
        if len(channels) > 1 and not converted:
            self.warnings.append(
                f"images with different channel counts {dict(sorted(channels.items()))} (channels: images): "
                "convert them to one (e.g. RGB to greyscale) before training"
            )
        return self.dims_seen.most_common(1)[0][0], channels.most_common(1)[0][0], converted

    def intensity(self, modalities: Sequence[str | None]) -> list[dict[str, Any]]:
        """Per channel: the statistics of the foreground (the whole images when no case has foreground)."""
        over = "foreground" if self.task == "segmentation" and self.centroids and self.samples else "whole image"
        for c in self.empty[0]:
            if c not in self.samples:
                self.samples[c], self.moments[c] = self.empty[0][c], self.empty[1][c]
        intensity = []
        for c in sorted(self.samples):
            n, s, s2, lo, hi = self.moments[c]
            mean = s / n
            whole = self.whole[c]
            mod = modalities[c] if c < len(modalities) else (modalities[0] if len(modalities) == 1 else None)
            intensity.append(
                {"channel": c, "modality": mod, "over": over, "mean": mean,
                 "std": math.sqrt(max(s2 / n - mean * mean, 0.0)), "min": lo, "max": hi,
                 **_stats(np.concatenate(self.samples[c])), "image_min": whole[0], "image_max": whole[1],
                 "integer": bool(whole[2]), "ct_like": is_ct_like(bool(whole[2]), whole[0], mod)}
            )  # fmt: skip
        return intensity

    def classes(self, names: Sequence[str], label_values: Sequence[int] | None) -> list[dict[str, Any]]:
        """Per class: its share of the voxels (segmentation) or samples (classification) and where it is."""
        voxels, present = self.voxels, self.present
        total = float(voxels.sum()) or 1.0
        classes = []
        for i, name in enumerate(names):
            row: dict[str, Any] = {"index": i, "name": name}
            if self.to_index is not None and i < len(label_values):
                row["value"] = int(label_values[i])
            if self.task == "segmentation":
                row["voxel_fraction"] = float(voxels[i] / total) if i < voxels.size else 0.0
                row["images"] = int(present[i]) if i < present.size else 0
                if i > 0:
                    ext = self.extents.get(i)
                    row["median_extent"] = np.median(np.asarray(ext), 0).tolist() if ext else None
                    row["objects_per_image"] = float(np.median(self.objects[i])) if self.objects.get(i) else 0.0
            else:
                row["sample_fraction"] = float(voxels[i] / total) if i < voxels.size else 0.0
                row["samples"] = int(present[i]) if i < present.size else 0
            classes.append(row)
        return classes


def _reader(axcodes: str | None, spatial_dims: int | None):
    """A function loading an image or label map as the bundles do: channel first, a slice stored as (H, W, 1) 2D,
    reoriented to ``axcodes`` (images of other dimensions as they are: reported with the files)."""
    loader = LoadMedicalImage(ensure_channel_first=True, dtype=None)
    orient = Orientation(axcodes=axcodes, labels=ORIENTATION_LABELS) if axcodes else None

    def load(path: Any) -> Any:
        image = loader(path)
        image = image if spatial_dims is None else drop_unit_axes(image, spatial_dims)
        return orient(image) if orient is not None and len(axcodes) == image.ndim - 1 else image

    return load


def fingerprint_dataset(
    lists: Mapping[str, Sequence[Mapping[str, Any]]],
    task: str = "segmentation",
    class_names: Sequence[str] | None = None,
    axcodes: str | None = None,
    modality: str | Sequence[str] | None = None,
    max_cases: int | None = 500,
    seed: int = 0,
    label_values: Sequence[int] | None = None,
    spatial_dims: int | None = None,
) -> dict[str, Any]:
    """Measure a dataset (see the module docstring).

    Args:
        lists: the datalist's lists, e.g. ``{"training": [...], "validation": [...]}`` (entries with absolute paths,
            as :func:`medkd.data.loading.load_datalist` returns them).
        task: ``"segmentation"`` (labels are label-map paths) or ``"classification"`` (integer class indices).
        class_names: class names by index (background first for segmentation); used for lateral names.
        axcodes: orientation the bundle reorients to (``"RA"``, ``"RAS"``); positions and axes are measured after it.
        modality: the datalist's modality (``"CT"``, ``"MRI"``; one per channel or one for all), if known.
        max_cases: read at most this many cases, evenly spread over the lists (``None``: all).
        seed: seed of the intensity subsampling.
        label_values: segmentation: the value of each class in the label maps, in class order (the datalist's
            ``labels`` map, :mod:`medkd.data.labels`); default: the values are the class indices.
        spatial_dims: the bundle's; images with more spatial axes, the extra ones of size 1 (a 2D slice stored as
            ``(H, W, 1)``), are measured as the bundles load them (:func:`medkd.data.loading.drop_unit_axes`).

    Raises:
        DataError: no image, or unreadable images (from the loader).
    """
    items = [(key, item) for key, entries in lists.items() for item in entries]
    if not items:
        raise DataError("the datalist has no training or validation entries: nothing to plan from.")
    read = _subset(items, max_cases)
    load = _reader(axcodes, spatial_dims)
    tally = _Tally(task, class_names, label_values, seed)
    for _key, item in read:
        array, spacing = tally.add_image(load(item["image"]), item["image"])
        mask, label = None, item.get("label")
        if task == "segmentation" and label is not None and not isinstance(label, int | np.integer):
            lab = np.rint(np.asarray(load(label).detach().cpu().numpy())[0])
            mask = tally.add_label_map(lab, label, list(array.shape[1:]), spacing)
        elif task == "classification" and label is not None:
            tally.add_class_index(int(label))
        tally.add_intensities(array, mask)
    dims, in_channels, converted = tally.dimensions()
    modalities = [modality] if isinstance(modality, str) or modality is None else list(modality)
    intensity = tally.intensity(modalities)
    names = list(class_names) if class_names else [str(i) for i in range(tally.voxels.size)]
    names += [str(i) for i in range(len(names), tally.voxels.size)]
    lateral = lateral_classes(names, tally.centroids, dims, background=task == "segmentation")
    for w in tally.warnings:
        logger.warning("plan: %s", w)
    fingerprint = {
        "task": task,
        "cases": len(read),
        "lists": {key: len(entries) for key, entries in lists.items()},
        "spatial_dims": dims,
        "in_channels": in_channels,
        "channels_seen": {str(k): v for k, v in sorted(tally.channels_seen.items())},
        "pictures_converted": converted,
        "axcodes": axcodes,
        "spacing": _summary(tally.spacings),
        "size": _summary(tally.sizes),
        "intensity": intensity,
        "classes": tally.classes(names, label_values),
        "lateral": lateral,
        "warnings": tally.warnings,
        "per_case": {"image": tally.files, "size": tally.sizes, "spacing": tally.spacings},
    }
    return _round(fingerprint)


def _class_stats(lab, spacing, voxels, present, extents, objects) -> dict[int, list[float]]:
    """Add one label map's voxel count per class, the extent of each object (connected component) per foreground
    class, and return the offset of each foreground class's centroid from the image centre, per axis, as a fraction
    of the axis."""
    flat = lab.reshape(-1)
    counts = np.zeros(voxels.size, dtype=np.int64)
    for start in range(0, flat.size, 1 << 24):  # bincount copies to int64: in blocks, for large volumes
        counts += np.bincount(flat[start : start + (1 << 24)], minlength=voxels.size)[: voxels.size]
    voxels += counts
    present += counts > 0
    shape = np.asarray(lab.shape, dtype=float)
    centres = {}
    for c in np.flatnonzero(counts):
        if c == 0:
            continue
        mask = lab == c
        centres[int(c)] = ((np.asarray(ndimage.center_of_mass(mask)) - (shape - 1) / 2) / shape).tolist()
        components, count = ndimage.label(mask)
        objects.setdefault(int(c), []).append(count)
        for box in ndimage.find_objects(components):
            if box is not None:
                extents.setdefault(int(c), []).append(
                    [(s.stop - s.start) * sp for s, sp in zip(box, spacing, strict=False)]
                )
    return centres
