"""Plan: bundle settings decided from a data fingerprint (nnU-Net's rules of thumb, adapted to the medkd bundles).

:func:`make_settings` turns a fingerprint (:mod:`medkd.planning.fingerprint`) into the values of bundle keys, with a
reason for each. The keys are the bundles' own (``pixdim``, ``patch_size``, ``batch_size``, ...), so any of them is
overridden on the command line as usual (``--patch_size "[128,128]"``).

The device sets the budget (:data:`BUDGETS`): the voxels of one training batch (patch voxels times batch size), and
the training iterations of one stage. The numbers are rules of thumb for the bundles' networks (U-Nets of 16-32 base
channels), not measurements of the machine; pass ``voxel_budget`` / ``total_iterations`` to change them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "BUDGETS",
    "make_settings",
    "target_spacing",
    "unet_strides",
    "fit_patch",
    "teacher_channels",
    "scale_channels",
    "device_kind",
    "validation_interval",
]

# per device kind: voxels of one training batch (patch voxels x batch size) and training iterations per stage
BUDGETS: dict[str, dict[str, dict[str, int]]] = {
    "segmentation": {
        "cpu": {"voxels": 2**19, "iterations": 2_500},  # e.g. 8 x 256x256, or 2 x 64^3
        "cuda": {"voxels": 2**22, "iterations": 25_000},  # e.g. 64 x 256x256, or 2 x 128^3
    },
    "classification": {
        "cpu": {"voxels": 2**19, "iterations": 2_500},
        "cuda": {"voxels": 2**22, "iterations": 10_000},
    },
}
MIN_FEATURE_SIZE = 4  # stop downsampling an axis when its feature map would fall below this many voxels
MAX_LEVELS = {2: 6, 3: 5}  # at most this many downsamplings (U-Net levels - 1)
MAX_ITERATIONS_PER_EPOCH = 250  # nnU-Net's epoch
MIN_ITERATIONS_PER_EPOCH = 50  # small data sets are cycled: fewer, longer epochs (less logging and validation)
EPOCHS = {"segmentation": (20, 1000), "classification": (10, 200)}  # min, max
VALIDATIONS_PER_RUN = 50  # validate about this many times per run (val_interval)
IMBALANCE = 3.0  # classification: balanced sampling when the most common class has this many samples per rarest's
ANISOTROPY = 3.0  # nnU-Net: an axis more than 3x coarser than the others (and with few voxels) is anisotropic


def device_kind(device: Any) -> str:
    """``"cuda"`` for a CUDA device (``torch.device``, ``"cuda:0"``), else ``"cpu"``."""
    kind = getattr(device, "type", None) or str(device).split(":")[0]
    return "cuda" if kind == "cuda" else "cpu"


def target_spacing(fingerprint: Mapping[str, Any]) -> tuple[list[float], str]:
    """The median spacing; in 3D, for an axis much coarser than the others with few voxels along it, the 10th
    percentile of its spacings instead (nnU-Net), so that thick slices are not interpolated into many thin ones."""
    spacing = [float(s) for s in fingerprint["spacing"]["median"]]
    reason = "median spacing of the images"
    if len(spacing) == 3:
        size = [float(s) for s in fingerprint["size"]["median"]]
        worst = int(np.argmax(spacing))
        others = [d for d in range(3) if d != worst]
        aniso_spacing = spacing[worst] > ANISOTROPY * min(spacing[d] for d in others)
        aniso_voxels = size[worst] * ANISOTROPY < min(size[d] for d in others)
        if aniso_spacing and aniso_voxels:
            p10 = float(fingerprint["spacing"]["percentile_10"][worst])
            spacing[worst] = max(p10, max(spacing[d] for d in others) + 1e-5)
            reason = (
                f"median spacing; axis {worst} is anisotropic (over {ANISOTROPY:g}x coarser, few voxels): the 10th "
                "percentile of its spacings (nnU-Net)"
            )
    return [round(s, 5) for s in spacing], reason


def unet_strides(patch: Sequence[int], spacing: Sequence[float], max_levels: int) -> list[list[int]]:
    """Per level, the stride of each axis (2 or 1): an axis is downsampled while its feature map stays at least
    :data:`MIN_FEATURE_SIZE` voxels and its current spacing is less than twice the finest (nnU-Net's rule)."""
    size, current = [float(p) for p in patch], [float(s) for s in spacing]
    strides = []
    for _ in range(max_levels):
        finest = min(current)
        axes = [d for d in range(len(size)) if size[d] / 2 >= MIN_FEATURE_SIZE and current[d] / finest < 2]
        if not axes:
            break
        strides.append([2 if d in axes else 1 for d in range(len(size))])
        for d in axes:
            size[d] /= 2
            current[d] *= 2
    return strides


def total_strides(strides: Sequence[Sequence[int]], dims: int) -> list[int]:
    return [math.prod(level[d] for level in strides) for d in range(dims)]


def fit_patch(
    median_shape: Sequence[float], spacing: Sequence[float], max_voxels: float, max_levels: int
) -> tuple[list[int], list[list[int]]]:
    """A patch covering the median image (after resampling) within ``max_voxels``, shrunk along its physically
    longest axis first, then rounded down to a multiple of the U-Net's total stride on each axis; and the strides."""
    patch = [max(float(s), 8.0) for s in median_shape]
    while math.prod(patch) > max_voxels:
        d = int(np.argmax([p * s for p, s in zip(patch, spacing, strict=True)]))
        patch[d] *= 0.9
    rounded = [int(p) for p in patch]
    for _ in range(3):  # rounding can remove a level; settle on strides the rounded patch satisfies
        strides = unet_strides(rounded, spacing, max_levels)
        total = total_strides(strides, len(rounded))
        new = [max(t, (p // t) * t) for p, t in zip(rounded, total, strict=True)]
        if new == rounded:
            break
        rounded = new
    return rounded, strides


def teacher_channels(levels: int, device: str, spatial_dims: int) -> list[int]:
    """Channels per U-Net level: 16 (CPU) or 32 (GPU) at full resolution, doubled per level, capped at 256 (CPU)
    or 320 (GPU); ``levels`` downsamplings make ``levels + 1`` entries."""
    base, cap = (32, 320) if device == "cuda" else (16, 256)
    return [min(base * 2**i, cap) for i in range(levels + 1)]


def scale_channels(channels: Sequence[int], compression: float, minimum: int = 4) -> list[int]:
    """Student channels: ``compression`` times the teacher's per level (at least ``minimum``), e.g. 0.5 makes
    [16, 32, 64, 128] into [8, 16, 32, 64]."""
    if not 0 < float(compression) <= 1:
        from medkd.errors import ConfigError

        raise ConfigError(
            f"compression {compression!r} must be in (0, 1]: the students' fraction of the teacher's channels."
        )
    return [max(minimum, int(round(c * float(compression)))) for c in channels]


def validation_interval(plan: Mapping[str, Any], max_epochs: int) -> int:
    """The plan's ``val_interval`` for its own ``max_epochs``; for another number of epochs (an override), about
    :data:`VALIDATIONS_PER_RUN` validations per run. The bundles' default settings keep theirs."""
    if not getattr(plan, "planned", True) or int(max_epochs) == int(plan.get("max_epochs", max_epochs)):
        return int(plan["val_interval"])
    return max(1, round(int(max_epochs) / VALIDATIONS_PER_RUN))


def _compact_strides(strides: Sequence[Sequence[int]]) -> list[int | list[int]]:
    """As MONAI's ``UNet`` takes them: ``2`` for a level that halves every axis, else the per-axis list."""
    return [2 if all(s == 2 for s in level) else list(level) for level in strides]


def _normalization(fingerprint: Mapping[str, Any]) -> tuple[dict | list[dict], str]:
    schemes, reasons = [], []
    for ch in fingerprint["intensity"]:
        if ch.get("ct_like"):
            lo, hi = ch["percentile_00_5"], ch["percentile_99_5"]
            schemes.append({"scheme": "ct", "clip": [lo, hi], "mean": ch["mean"], "std": max(ch["std"], 1e-8)})
            reasons.append(
                f"channel {ch['channel']}: CT-like (integer values, minimum {ch['image_min']:g}) -> clip to the "
                f"{ch['over']} 0.5-99.5 percentiles [{lo:g}, {hi:g}] and scale by its mean and std"
            )
        else:
            schemes.append({"scheme": "zscore"})
            reasons.append(f"channel {ch['channel']}: not CT-like -> per-image z-score")
    if len(schemes) == 1 or all(s == schemes[0] for s in schemes):
        return schemes[0], "; ".join(reasons)
    return schemes, "; ".join(reasons)


def _epochs(n_train: int, batch: int, task: str, budget: Mapping[str, int]) -> tuple[dict, str]:
    one_pass = max(1, math.ceil(n_train / batch))
    per_epoch = min(max(one_pass, MIN_ITERATIONS_PER_EPOCH), MAX_ITERATIONS_PER_EPOCH)
    low, high = EPOCHS[task]
    epochs = int(min(high, max(low, round(budget["iterations"] / per_epoch))))
    settings = {
        "iterations_per_epoch": None if per_epoch == one_pass else per_epoch,
        "max_epochs": epochs,
        "val_interval": max(1, round(epochs / VALIDATIONS_PER_RUN)),
    }
    epoch = "one pass over the training list" if per_epoch == one_pass else f"{per_epoch / one_pass:.3g} passes"
    reason = (
        f"{n_train} training cases, {batch} per iteration: an epoch is {epoch} ({per_epoch} iterations); "
        f"about {budget['iterations']} iterations per stage on this device -> {epochs} epochs "
        f"(within {low}-{high}), validated every {settings['val_interval']}"
    )
    return settings, reason


def make_settings(
    fingerprint: Mapping[str, Any],
    task: str = "segmentation",
    device: Any = "cpu",
    voxel_budget: int | None = None,
    total_iterations: int | None = None,
    samples_per_volume: int | None = None,
    lateral: bool | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """The bundle settings planned for a fingerprint, and the reason for each.

    Args:
        fingerprint: from :func:`medkd.planning.fingerprint.fingerprint_dataset`.
        task: ``"segmentation"`` or ``"classification"``.
        device: the training device (``"cpu"``, ``"cuda"``, a ``torch.device``): picks the budget.
        voxel_budget: voxels of one training batch (default: :data:`BUDGETS`).
        total_iterations: training iterations per stage (default: :data:`BUDGETS`).
        samples_per_volume: patches cropped per volume and iteration (segmentation; default 1 in 2D, 2 in 3D).
        lateral: classification only: the findings are lateralised (no left-right flips); default: a class name
            holds a side word.
    """
    kind = device_kind(device)
    budget = dict(BUDGETS[task][kind])
    if voxel_budget:
        budget["voxels"] = int(voxel_budget)
    if total_iterations:
        budget["iterations"] = int(total_iterations)
    dims = int(fingerprint["spatial_dims"])
    n_train = int(fingerprint["lists"].get("training", fingerprint["cases"]))
    settings: dict[str, Any] = {"in_channels": int(fingerprint["in_channels"])}
    reasons: dict[str, str] = {"in_channels": f"channels of the images {fingerprint['channels_seen']}"}
    if fingerprint.get("pictures_converted"):
        reasons["in_channels"] += (
            f" (PNG/JPEG/BMP, alpha left out): the most common; the others are converted to {settings['in_channels']} "
            "as they load (RGB to greyscale by luminance, or greyscale repeated)"
        )
    norm, reasons["normalization"] = _normalization(fingerprint)
    lateral_axes = sorted({int(entry["axis"]) for entry in fingerprint.get("lateral", [])})
    if task == "classification":
        settings.update(_classification(fingerprint, budget, n_train, kind, lateral, reasons))
        settings["normalization"] = norm
        return settings, reasons

    spacing, reasons["pixdim"] = target_spacing(fingerprint)
    per_case = fingerprint.get("per_case", {})
    if per_case.get("size"):
        shapes = [
            [sz * sp / t for sz, sp, t in zip(size, sp_case, spacing, strict=True)]
            for size, sp_case in zip(per_case["size"], per_case["spacing"], strict=True)
        ]
        median_shape = np.median(np.asarray(shapes), 0).tolist()
        total_voxels = float(sum(math.prod(s) for s in shapes))
    else:
        sizes, spacings = fingerprint["size"]["median"], fingerprint["spacing"]["median"]
        median_shape = [s * sp / t for s, sp, t in zip(sizes, spacings, spacing, strict=True)]
        total_voxels = math.prod(median_shape) * fingerprint["cases"]
    spv = int(samples_per_volume or (2 if dims == 3 else 1))
    max_patch = budget["voxels"] / 2  # at least 2 patches per batch
    patch, strides = fit_patch(median_shape, spacing, max_patch, MAX_LEVELS[dims])
    shown = "x".join(str(round(s)) for s in median_shape)
    covered = [round(min(1.0, p / s), 2) for p, s in zip(patch, median_shape, strict=True)]
    reasons["patch_size"] = (
        f"median image after resampling {shown} voxels; the patch covers {covered} of it per axis, within the "
        f"{kind} budget of {budget['voxels']} voxels per batch of at least 2, a multiple of the U-Net's total stride"
    )
    patch_voxels = math.prod(patch)
    cap = max(2, math.floor(0.05 * total_voxels / patch_voxels))  # nnU-Net: a batch is at most 5% of the data
    patches = int(min(64, cap, max(2, budget["voxels"] // patch_voxels)))
    batch = max(1, patches // spv)
    reasons["batch_size"] = (
        f"{budget['voxels']} voxels per batch / {patch_voxels} per patch, at least 2 patches, at most 5% of the "
        f"data's voxels ({cap} patches) and 64" + (f"; {spv} patches per volume" if spv > 1 else "")
    )
    channels = teacher_channels(len(strides), kind, dims)
    channel_cap = 320 if kind == "cuda" else 256
    reasons["strides"] = (
        f"downsample each axis while its feature map keeps at least {MIN_FEATURE_SIZE} voxels and its spacing is "
        f"under twice the finest (at most {MAX_LEVELS[dims]} levels)"
    )
    reasons["teacher_channels"] = (
        f"{channels[0]} channels at full resolution on {kind}, doubled per level, at most {channel_cap}"
    )
    flips = [d for d in range(dims) if d not in lateral_axes]
    if lateral_axes:
        named = [" / ".join(e["names"]) + f" (axis {e['axis']}, by {' and '.join(e['found_by'])})"
                 for e in fingerprint["lateral"]]  # fmt: skip
        reasons["flip_axes"] = f"no flips along axes {lateral_axes}: lateral classes {'; '.join(named)}"
    else:
        reasons["flip_axes"] = "no lateral classes: flips along every axis"
    anisotropic = max(spacing) > ANISOTROPY * min(spacing)
    if dims == 3 and anisotropic:
        worst = int(np.argmax(spacing))
        rotate: float | list[float] = [15.0 if d == worst else 0.0 for d in range(3)]
        reasons["rotate_degrees"] = f"anisotropic spacing: rotations of up to 15 degrees about axis {worst} only"
    else:
        rotate = 15.0
        reasons["rotate_degrees"] = "small rotations (up to 15 degrees) and scaling (0.8-1.2), probability 0.2 each"
    epochs, reasons["max_epochs"] = _epochs(n_train, batch, "segmentation", budget)
    sw_batch = int(max(1, min(8, budget["voxels"] // patch_voxels)))
    overlap = 0.5 if kind == "cuda" else 0.25
    reasons["sw_overlap"] = f"sliding windows overlap by {overlap} on {kind} (0.5 on GPU, 0.25 on CPU for speed)"
    settings.update(
        {
            "pixdim": spacing,
            "patch_size": patch,
            "batch_size": batch,
            **({"samples_per_volume": spv} if dims == 3 else {}),
            **epochs,
            "normalization": norm,
            "flip_axes": flips,
            "rot90_axes": None,
            "rotate_degrees": rotate,
            "scale_range": 0.2,
            "intensity_augmentation": True,
            "sw_overlap": overlap,
            "sw_batch_size": sw_batch,
            "strides": _compact_strides(strides),
            "teacher_channels": channels,
        }
    )
    return settings, reasons


def _classification(fingerprint, budget, n_train, kind, lateral, reasons) -> dict[str, Any]:
    median = [float(s) for s in fingerprint["size"]["median"]]
    size = list(median)
    max_pixels = budget["voxels"] / 8  # at least 8 images per batch
    while math.prod(size) > max_pixels:
        size = [s * 0.9 for s in size]
    patch_size = [max(32, int(round(s / 32)) * 32) for s in size]
    reasons["patch_size"] = (
        f"median image {'x'.join(str(round(s)) for s in median)}, scaled to fit {budget['voxels']} pixels per batch "
        "of at least 8 and rounded to a multiple of 32 (the networks downsample by 32)"
    )
    batch = int(min(64, max(8, budget["voxels"] // math.prod(patch_size)), max(8, n_train // 4)))
    reasons["batch_size"] = f"{budget['voxels']} pixels per batch / {math.prod(patch_size)} per image, 8 to 64"
    named = [e for e in fingerprint.get("lateral", [])]
    if lateral is None:
        lateral = bool(named)
    dims = int(fingerprint["spatial_dims"])
    flips = list(range(dims))  # the bundle leaves axis 0 out while `lateral` is true (medkd.planning.lateral_flips)
    reasons["lateral"] = (
        f"class names with a side ({', '.join(n for e in named for n in e['names'])}): lateralised findings"
        if named
        else "no class name holds a side word; pass --lateral True for lateralised findings"
    )
    reasons["flip_axes"] = (
        "flips along every axis, but the bundle leaves out the left-right axis 0 while `lateral` is true"
        + (" (it is)" if lateral else "")
    )
    reasons["rotate_degrees"] = "small rotations (up to 15 degrees) and scaling (0.9-1.1), probability 0.2 each"
    epochs, reasons["max_epochs"] = _epochs(n_train, batch, "classification", budget)
    balanced, reasons["balanced_sampling"] = _balanced_sampling(fingerprint)
    return {
        "patch_size": patch_size,
        "batch_size": batch,
        **epochs,
        "lateral": bool(lateral),
        "flip_axes": flips,
        "rot90_axes": None,
        "rotate_degrees": 15.0,
        "scale_range": 0.1,
        "intensity_augmentation": True,
        "balanced_sampling": balanced,
    }


def _balanced_sampling(fingerprint: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether to draw every class equally often (:mod:`medkd.data.balance`): when the training list's most common
    class has at least :data:`IMBALANCE` times the samples of its rarest; and why."""
    counts = {c["name"]: int(c.get("samples", 0)) for c in fingerprint.get("classes", [])}
    present = {name: n for name, n in counts.items() if n}
    if len(present) < 2:
        return False, "fewer than two classes among the samples read: nothing to balance"
    common, rare = max(present, key=present.get), min(present, key=present.get)
    ratio = present[common] / present[rare]
    if ratio >= IMBALANCE:
        return True, (
            f"imbalanced classes ({common} {ratio:.3g}x as many samples as {rare} in the lists read, at least "
            f"{IMBALANCE:g}x): each "
            "class drawn equally often, so that the rare classes are not traded for accuracy on the common ones"
        )
    return False, f"classes within {IMBALANCE:g}x of each other ({common} {ratio:.3g}x {rare}): uniform sampling"
