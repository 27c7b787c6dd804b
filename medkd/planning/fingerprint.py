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
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medkd.data.channels import is_picture, picture_channels
from medkd.data.loading import ORIENTATION_LABELS, DataError, LoadMedicalImage, drop_unit_axes

__all__ = ["fingerprint_dataset", "name_side", "lateral_by_name", "lateral_by_position", "is_ct_like"]

logger = logging.getLogger("medkd.planning")

LEFT = frozenset({"left", "l", "lt", "sinister", "sinistra", "sinistrum", "sin"})
RIGHT = frozenset({"right", "r", "rt", "dexter", "dextra", "dextrum", "dex"})
SAMPLES_PER_CASE = 10_000  # intensity values kept per image and channel for the percentiles (as nnU-Net)
POSITION_MARGIN = 0.05  # a centroid is on one side when it is this fraction of the axis away from the centre
POSITION_AGREEMENT = 0.9  # ... the same way round in at least this fraction of the images holding both classes
HU_MINIMUM = -500.0  # CT-like: integer values whose minimum is below this (air is -1000 HU)


def _tokens(name: str) -> list[str]:
    """Lower-case words of a class name: split at non-alphanumerics and camel case; ``L1`` stays one token."""
    words = []
    for part in re.split(r"[^A-Za-z0-9]+", str(name)):
        if not part:
            continue
        if any(c.isdigit() for c in part):
            words.append(part)
        else:
            words += re.findall(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+", part)
    return [w.lower() for w in words]


def name_side(name: str) -> str | None:
    """``"left"``, ``"right"`` or ``None`` from the words of a class name (``left_lung``, ``LungR``, ``clavicle
    lt``, ``ren sinister``)."""
    words = set(_tokens(name))
    left, right = bool(words & LEFT), bool(words & RIGHT)
    return "left" if left and not right else "right" if right and not left else None


def _base(name: str) -> str:
    return " ".join(w for w in _tokens(name) if w not in LEFT | RIGHT)


def lateral_by_name(class_names: Sequence[str], background: bool = True) -> tuple[list[tuple[int, int]], list[int]]:
    """``(pairs, singles)``: ``(left, right)`` class indices whose names differ only by a side word, and classes
    named with a side but without a partner. With ``background`` (segmentation), class 0 is the background and never
    lateral; a classifier's class 0 is a finding like the others."""
    sides = {i: name_side(n) for i, n in enumerate(class_names) if i > 0 or not background}
    pairs, paired = [], set()
    for i, side in sides.items():
        if side != "left":
            continue
        partner = next(
            (
                j
                for j, s in sides.items()
                if s == "right" and j not in paired and _base(class_names[j]) == _base(class_names[i])
            ),
            None,
        )
        if partner is not None:
            pairs.append((i, partner))
            paired |= {i, partner}
    singles = [i for i, s in sides.items() if s and i not in paired]
    return pairs, singles


def lateral_by_position(
    centroids: Sequence[Mapping[int, Sequence[float]]],
    margin: float = POSITION_MARGIN,
    agreement: float = POSITION_AGREEMENT,
    min_images: int = 2,
) -> list[dict]:
    """Pairs of classes that lie on opposite sides of the image centre along one axis, consistently.

    Args:
        centroids: per image, ``{class: offset of its centroid from the image centre, per axis, as a fraction of
            the axis length}`` (-0.5..0.5).
        margin: how far from the centre (fraction of the axis) a centroid must be to count as on one side.
        agreement: fraction of the images holding both classes in which they must be on opposite sides, the same
            way round.
        min_images: fewest images holding both classes for a decision.

    Returns:
        ``[{"classes": [a, b], "axis": d, "agreement": f, "images": n}]`` with ``a`` on the low side of axis ``d``
        (smaller index) in most images.
    """
    classes = sorted({c for image in centroids for c in image})
    found = []
    for i, a in enumerate(classes):
        for b in classes[i + 1 :]:
            both = [(image[a], image[b]) for image in centroids if a in image and b in image]
            if len(both) < min_images:
                continue
            best = None
            for axis in range(len(both[0][0])):
                votes = [
                    (1 if ca[axis] < 0 else -1)
                    if abs(ca[axis]) > margin and abs(cb[axis]) > margin and (ca[axis] < 0) != (cb[axis] < 0)
                    else 0
                    for ca, cb in both
                ]
                score = abs(sum(votes)) / len(both)
                spread = float(np.mean([abs(ca[axis] - cb[axis]) for ca, cb in both]))
                if score >= agreement and (best is None or (score, spread) > (best[1], best[2])):
                    best = (axis, score, spread, sum(votes) > 0)
            if best is not None:
                axis, score, _, a_low = best
                pair = [a, b] if a_low else [b, a]
                found.append({"classes": pair, "axis": axis, "agreement": round(score, 3), "images": len(both)})
    return found


def _side_axis(centroids: Sequence[Mapping[int, Sequence[float]]], c: int, margin: float = POSITION_MARGIN):
    """The axis along which class ``c`` lies consistently off-centre, or ``None``."""
    offsets = [image[c] for image in centroids if c in image]
    if len(offsets) < 2:
        return None
    best = None
    for axis in range(len(offsets[0])):
        votes = [(1 if o[axis] < 0 else -1) if abs(o[axis]) > margin else 0 for o in offsets]
        score = abs(sum(votes)) / len(offsets)
        if score >= POSITION_AGREEMENT and (best is None or score > best[1]):
            best = (axis, score)
    return None if best is None else best[0]


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
    from monai.transforms import Orientation

    items = [(key, item) for key, entries in lists.items() for item in entries]
    if not items:
        raise DataError("the datalist has no training or validation entries: nothing to plan from.")
    read = _subset(items, max_cases)
    rng = np.random.default_rng(seed)
    loader = LoadMedicalImage(ensure_channel_first=True, dtype=None)

    def load(path: Any) -> Any:  # as the bundles load it: a slice stored as (H, W, 1) is 2D
        image = loader(path)
        return image if spatial_dims is None else drop_unit_axes(image, spatial_dims)

    orient = Orientation(axcodes=axcodes, labels=ORIENTATION_LABELS) if axcodes else None
    modalities = [modality] if isinstance(modality, str) or modality is None else list(modality)

    dims_seen: Counter = Counter()
    example: dict[int, str] = {}  # the first image of each dimensionality
    channels_seen: Counter = Counter()
    pictures: Counter = Counter()  # the channels of the PNG, JPEG and BMP files, which the bundles convert
    sizes, spacings, files = [], [], []
    samples: dict[int, list[np.ndarray]] = {}
    moments: dict[int, list[float]] = {}  # count, sum, sum of squares, min, max over the sampled region
    whole: dict[int, list[float]] = {}  # whole-image min, max; integral values
    empty: tuple[dict, dict] = ({}, {})  # samples and moments of the cases without foreground
    num_classes = len(class_names) if class_names else 0
    to_index = _index_table(label_values) if task == "segmentation" and label_values is not None else None
    voxels = np.zeros(max(num_classes, 1), dtype=np.float64)
    present = np.zeros(max(num_classes, 1), dtype=np.int64)
    extents: dict[int, list[list[float]]] = {}
    objects: dict[int, list[int]] = {}
    centroids: list[dict[int, list[float]]] = []
    warnings: list[str] = []

    for _key, item in read:
        image = load(item["image"])
        if orient is not None and len(axcodes) == image.ndim - 1:  # other dimensions: reported below, with the files
            image = orient(image)
        array = np.asarray(image.detach().cpu().numpy() if hasattr(image, "detach") else image)
        dims = array.ndim - 1
        dims_seen[dims] += 1
        example.setdefault(dims, str(item["image"]))
        if is_picture(item["image"], dims):  # its alpha is dropped as the bundles load it
            array = array[: picture_channels(array.shape[0])]
            pictures[array.shape[0]] += 1
        channels_seen[array.shape[0]] += 1
        shape = list(array.shape[1:])
        spacing = [float(s) for s in np.asarray(getattr(image, "pixdim", [1.0] * dims), dtype=float)[:dims]]
        sizes.append(shape)
        spacings.append(spacing)
        files.append(str(item["image"]))
        mask = None
        label = item.get("label")
        if task == "segmentation" and label is not None and not isinstance(label, int | np.integer):
            lab = load(label)
            if orient is not None and len(axcodes) == lab.ndim - 1:
                lab = orient(lab)
            lab = np.rint(np.asarray(lab.detach().cpu().numpy())[0])
            if to_index is not None:
                lab = _to_indices(lab, to_index, label, warnings)
            if list(lab.shape) != shape:
                warnings.append(f"{label}: label shape {list(lab.shape)} differs from its image {shape}; skipped")
            else:
                top = num_classes or int(lab.max()) + 1
                outside = (lab < 0) | (lab >= top)
                if outside.any():
                    values = np.unique(lab[outside])[:5].astype(int).tolist()
                    warnings.append(
                        f"{label}: label values {values} outside 0..{top - 1} counted as background (check-data "
                        "says how to fix them)"
                    )
                    lab = np.where(outside, 0, lab)
                lab = lab.astype(np.uint8 if top <= 256 else np.int32)
                mask = lab > 0
                if voxels.size < top:
                    voxels = np.pad(voxels, (0, top - voxels.size))
                    present = np.pad(present, (0, top - present.size))
                centroids.append(_class_stats(lab, spacing, voxels, present, extents, objects))
        elif task == "classification" and label is not None:
            index = int(label)
            if voxels.size <= index:
                voxels = np.pad(voxels, (0, index + 1 - voxels.size))
                present = np.pad(present, (0, index + 1 - present.size))
            voxels[index] += 1
            present[index] += 1
        # a case without foreground (a negative case) adds to the foreground statistics nothing; its whole image is
        # used only when no case has foreground
        into = empty if mask is not None and not mask.any() else (samples, moments)
        for c in range(array.shape[0]):
            channel = array[c].astype(np.float32)
            _add_region(into, c, channel[mask] if mask is not None and mask.any() else channel.ravel(), rng)
            probe = channel.ravel()[:: max(1, channel.size // SAMPLES_PER_CASE)]
            w = whole.setdefault(c, [math.inf, -math.inf, 1.0])
            w[0], w[1] = min(w[0], float(channel.min())), max(w[1], float(channel.max()))
            w[2] = w[2] and float(np.all(np.mod(probe, 1) == 0))

    if len(dims_seen) > 1:
        seen = ", ".join(f"{n} {d}D, e.g. {example[d]}" for d, n in sorted(dims_seen.items()))
        raise DataError(
            f"the datalist mixes images of several dimensionalities ({seen}); a bundle takes one: list 2D and 3D "
            "images in separate datalists (or convert them)."
        )
    dims = dims_seen.most_common(1)[0][0]
    in_channels = channels_seen.most_common(1)[0][0]
    converted = len(channels_seen) > 1 and pictures == channels_seen and set(pictures) <= {1, 3}
    if len(channels_seen) > 1 and not converted:
        warnings.append(
            f"images with different channel counts {dict(sorted(channels_seen.items()))} (channels: images): "
            "convert them to one (e.g. RGB to greyscale) before training"
        )
    over = "foreground" if task == "segmentation" and centroids and samples else "whole image"
    for c in empty[0]:
        if c not in samples:
            samples[c], moments[c] = empty[0][c], empty[1][c]
    intensity = []
    for c in sorted(samples):
        values = np.concatenate(samples[c])
        n, s, s2, lo, hi = moments[c]
        mean = s / n
        std = math.sqrt(max(s2 / n - mean * mean, 0.0))
        mod = modalities[c] if c < len(modalities) else (modalities[0] if len(modalities) == 1 else None)
        intensity.append(
            {
                "channel": c,
                "modality": mod,
                "over": over,
                "mean": mean,
                "std": std,
                "min": lo,
                "max": hi,
                **_stats(values),
                "image_min": whole[c][0],
                "image_max": whole[c][1],
                "integer": bool(whole[c][2]),
                "ct_like": is_ct_like(bool(whole[c][2]), whole[c][0], mod),
            }
        )

    names = list(class_names) if class_names else [str(i) for i in range(voxels.size)]
    names += [str(i) for i in range(len(names), voxels.size)]
    total = float(voxels.sum()) or 1.0
    classes = []
    for i, name in enumerate(names):
        row: dict[str, Any] = {"index": i, "name": name}
        if to_index is not None and i < len(label_values):
            row["value"] = int(label_values[i])
        if task == "segmentation":
            row["voxel_fraction"] = float(voxels[i] / total) if i < voxels.size else 0.0
            row["images"] = int(present[i]) if i < present.size else 0
            if i > 0:
                ext = extents.get(i)
                row["median_extent"] = np.median(np.asarray(ext), 0).tolist() if ext else None
                row["objects_per_image"] = float(np.median(objects[i])) if objects.get(i) else 0.0
        else:
            row["sample_fraction"] = float(voxels[i] / total) if i < voxels.size else 0.0
            row["samples"] = int(present[i]) if i < present.size else 0
        classes.append(row)

    lateral = _lateral(names, centroids, dims, background=task == "segmentation")
    for w in warnings:
        logger.warning("plan: %s", w)
    fingerprint = {
        "task": task,
        "cases": len(read),
        "lists": {key: len(entries) for key, entries in lists.items()},
        "spatial_dims": dims,
        "in_channels": in_channels,
        "channels_seen": {str(k): v for k, v in sorted(channels_seen.items())},
        "pictures_converted": converted,
        "axcodes": axcodes,
        "spacing": _summary(spacings),
        "size": _summary(sizes),
        "intensity": intensity,
        "classes": classes,
        "lateral": lateral,
        "warnings": warnings,
        "per_case": {"image": files, "size": sizes, "spacing": spacings},
    }
    return _round(fingerprint)


def _class_stats(lab, spacing, voxels, present, extents, objects) -> dict[int, list[float]]:
    """Add one label map's voxel count per class, the extent of each object (connected component) per foreground
    class, and return the offset of each foreground class's centroid from the image centre, per axis, as a fraction
    of the axis."""
    from scipy import ndimage

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


def _lateral(
    names: Sequence[str], centroids: Sequence[Mapping[int, Sequence[float]]], dims: int, background: bool = True
) -> list[dict]:
    """Lateral classes: name pairs, position pairs, and single classes named with a side, each with its axis."""
    by_position = {tuple(sorted(p["classes"])): p for p in lateral_by_position(centroids)} if centroids else {}
    pairs, singles = lateral_by_name(names, background)
    found = []
    for left, right in pairs:
        pos = by_position.pop(tuple(sorted((left, right))), None)
        entry = {
            "classes": [left, right],
            "names": [names[left], names[right]],
            "found_by": ["name", "position"] if pos else ["name"],
            "axis": pos["axis"] if pos else 0,
        }
        if pos:
            entry.update(agreement=pos["agreement"], images=pos["images"])
        else:
            entry["note"] = "not separated by position in these images; axis 0 (left-right after reorientation) assumed"
        found.append(entry)
    for single in singles:
        axis = _side_axis(centroids, single) if centroids else None
        found.append(
            {
                "classes": [single],
                "names": [names[single]],
                "found_by": ["name"],
                "axis": 0 if axis is None else axis,
                **({} if axis is not None else {"note": "axis 0 (left-right after reorientation) assumed"}),
            }
        )
    for pos in by_position.values():
        a, b = pos["classes"]
        found.append({"classes": [a, b], "names": [names[a], names[b]], "found_by": ["position"], **{
            k: pos[k] for k in ("axis", "agreement", "images")}})  # fmt: skip
    return found
