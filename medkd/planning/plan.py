"""Plan: bundle settings decided from a data fingerprint (nnU-Net's rules of thumb, adapted to the medkd bundles).

A :class:`Planner` turns a fingerprint (:mod:`medkd.planning.fingerprint`) into the values of bundle keys, with a
reason for each, as nnU-Net's ``ExperimentPlanner`` does: :meth:`Planner.plan` calls its ``determine_*`` steps
(spacing, patch size, batch size, network, augmentation, epochs, ...), whose budgets and caps are class attributes;
:class:`SegmentationPlanner` (2D), :class:`SegmentationPlanner3D` and :class:`ClassificationPlanner` override only
what differs. :func:`make_settings` picks the planner for a task. The keys are the bundles' own (``pixdim``,
``patch_size``, ``batch_size``, ...), so any of them is overridden on the command line as usual
(``--patch_size "[128,128]"``).

The device sets the budget (``Planner.budgets``): the voxels of one training batch (patch voxels times batch size),
and the training iterations of one stage. The numbers are rules of thumb for the bundles' networks (U-Nets of 16-32
base channels), not measurements of the machine; pass ``voxel_budget`` / ``total_iterations`` to change them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from medkd.errors import ConfigError

__all__ = [
    "Planner",
    "SegmentationPlanner",
    "SegmentationPlanner3D",
    "ClassificationPlanner",
    "make_planner",
    "make_settings",
    "scale_channels",
    "device_kind",
    "validation_interval",
]

MAX_ITERATIONS_PER_EPOCH = 250  # nnU-Net's epoch
MIN_ITERATIONS_PER_EPOCH = 50  # small data sets are cycled: fewer, longer epochs (less logging and validation)
VALIDATIONS_PER_RUN = 50  # validate about this many times per run (val_interval)
IMBALANCE = 3.0  # classification: balanced sampling when the most common class has this many samples per rarest's
ANISOTROPY = 3.0  # nnU-Net: an axis more than 3x coarser than the others (and with few voxels) is anisotropic
Budget = dict[str, int]


def device_kind(device: Any) -> str:
    """``"cuda"`` for a CUDA device (``torch.device``, ``"cuda:0"``), else ``"cpu"``."""
    kind = getattr(device, "type", None) or str(device).split(":")[0]
    return "cuda" if kind == "cuda" else "cpu"


def scale_channels(channels: Sequence[int], compression: float, minimum: int = 4) -> list[int]:
    """Student channels: ``compression`` times the teacher's per level (at least ``minimum``), e.g. 0.5 makes
    [16, 32, 64, 128] into [8, 16, 32, 64]."""
    if not 0 < float(compression) <= 1:
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


class Planner:
    """The settings every task plans alike: input channels, intensity normalisation, epochs; and the budget.

    Args:
        fingerprint: from :func:`medkd.planning.fingerprint.fingerprint_dataset`.
        device: the training device (``"cpu"``, ``"cuda"``, a ``torch.device``): picks the budget.
        voxel_budget: voxels of one training batch (default: :attr:`budgets`).
        total_iterations: training iterations per stage (default: :attr:`budgets`).
    """

    task: ClassVar[str] = ""
    # per device kind: voxels of one training batch (patch voxels x batch size) and training iterations per stage
    budgets: ClassVar[dict[str, Budget]] = {
        "cpu": {"voxels": 2**19, "iterations": 2_500},
        "cuda": {"voxels": 2**22, "iterations": 25_000},
    }
    epochs: ClassVar[tuple[int, int]] = (20, 1000)  # min, max
    max_batch: ClassVar[int] = 64

    def __init__(
        self,
        fingerprint: Mapping[str, Any],
        device: Any = "cpu",
        voxel_budget: int | None = None,
        total_iterations: int | None = None,
    ):
        self.fingerprint = fingerprint
        self.device = device_kind(device)
        self.budget = self.determine_budget(voxel_budget, total_iterations)
        self.dims = int(fingerprint["spatial_dims"])
        self.n_train = int(fingerprint["lists"].get("training", fingerprint["cases"]))
        self.reasons: dict[str, str] = {}

    def plan(self) -> tuple[dict[str, Any], dict[str, str]]:
        """The bundle settings planned for the fingerprint, and the reason for each."""
        raise NotImplementedError

    def determine_budget(self, voxel_budget: int | None, total_iterations: int | None) -> Budget:
        """The device's budget, with the given voxels and iterations instead of its own."""
        budget = dict(self.budgets[self.device])
        budget.update({k: int(v) for k, v in (("voxels", voxel_budget), ("iterations", total_iterations)) if v})
        return budget

    def determine_in_channels(self) -> int:
        """The most common channel count of the images."""
        fp = self.fingerprint
        channels = int(fp["in_channels"])
        self.reasons["in_channels"] = f"channels of the images {fp['channels_seen']}"
        if fp.get("pictures_converted"):
            self.reasons["in_channels"] += (
                f" (PNG/JPEG/BMP, alpha left out): the most common; the others are converted to {channels} as they "
                "load (RGB to greyscale by luminance, or greyscale repeated)"
            )
        return channels

    def determine_normalization(self) -> dict | list[dict]:
        """Per channel: CT-like intensities clipped to their 0.5-99.5 percentiles and scaled by the data's mean and
        std, else a per-image z-score; one scheme when every channel has the same."""
        schemes, reasons = [], []
        for ch in self.fingerprint["intensity"]:
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
        self.reasons["normalization"] = "; ".join(reasons)
        return schemes[0] if all(s == schemes[0] for s in schemes) else schemes

    def determine_epochs(self, batch: int) -> dict[str, Any]:
        """``iterations_per_epoch`` (none: one pass over the training list), ``max_epochs`` for about the budget's
        iterations, within :attr:`epochs`, and ``val_interval``."""
        one_pass = max(1, math.ceil(self.n_train / batch))
        per_epoch = min(max(one_pass, MIN_ITERATIONS_PER_EPOCH), MAX_ITERATIONS_PER_EPOCH)
        low, high = self.epochs
        iterations = self.budget["iterations"]
        epochs = int(min(high, max(low, round(iterations / per_epoch))))
        settings = {
            "iterations_per_epoch": None if per_epoch == one_pass else per_epoch,
            "max_epochs": epochs,
            "val_interval": max(1, round(epochs / VALIDATIONS_PER_RUN)),
        }
        epoch = "one pass over the training list" if per_epoch == one_pass else f"{per_epoch / one_pass:.3g} passes"
        self.reasons["max_epochs"] = (
            f"{self.n_train} training cases, {batch} per iteration: an epoch is {epoch} ({per_epoch} iterations); "
            f"about {iterations} iterations per stage on this device -> {epochs} epochs "
            f"(within {low}-{high}), validated every {settings['val_interval']}"
        )
        return settings


class SegmentationPlanner(Planner):
    """2D segmentation: spacing, a patch and batch within the budget, a U-Net whose strides divide the patch,
    augmentation that keeps lateral classes apart, sliding-window inference.

    Args:
        samples_per_volume: patches cropped per volume and iteration (default :attr:`samples_per_volume`).
        fingerprint, device, voxel_budget, total_iterations: see :class:`Planner`.
    """

    task = "segmentation"
    max_levels: ClassVar[int] = 6  # at most this many downsamplings (U-Net levels - 1)
    min_feature_size: ClassVar[int] = 4  # stop downsampling an axis when its feature map would fall below this
    samples_per_volume: ClassVar[int] = 1
    data_fraction: ClassVar[float] = 0.05  # nnU-Net: a batch is at most 5% of the data's voxels
    channels: ClassVar[dict[str, tuple[int, int]]] = {"cpu": (16, 256), "cuda": (32, 320)}  # full resolution, cap
    sw_overlap: ClassVar[dict[str, float]] = {"cpu": 0.25, "cuda": 0.5}
    max_sw_batch: ClassVar[int] = 8

    def __init__(self, fingerprint: Mapping[str, Any], samples_per_volume: int | None = None, **budget: Any):
        super().__init__(fingerprint, **budget)
        self.spv = int(samples_per_volume or self.samples_per_volume)

    def plan(self) -> tuple[dict[str, Any], dict[str, str]]:
        in_channels = self.determine_in_channels()
        normalization = self.determine_normalization()
        spacing = self.determine_spacing()
        median_shape, total_voxels = self.resampled_shapes(spacing)
        patch, strides = self.determine_patch_size(median_shape, spacing)
        batch = self.determine_batch_size(patch, total_voxels)
        channels = self.determine_teacher_channels(strides)
        flips = self.determine_flip_axes()
        rotate = self.determine_rotation(spacing)
        epochs = self.determine_epochs(batch)
        overlap, sw_batch = self.determine_sliding_window(patch)
        settings = {
            "in_channels": in_channels,
            "pixdim": spacing,
            "patch_size": patch,
            "batch_size": batch,
            **self.extra_batch_settings(),
            **epochs,
            "normalization": normalization,
            "flip_axes": flips,
            "rot90_axes": None,
            "rotate_degrees": rotate,
            "scale_range": 0.2,
            "intensity_augmentation": True,
            "sw_overlap": overlap,
            "sw_batch_size": sw_batch,
            "strides": [2 if all(s == 2 for s in level) else list(level) for level in strides],  # as UNet takes them
            "teacher_channels": channels,
        }
        return settings, self.reasons

    def extra_batch_settings(self) -> dict[str, Any]:
        """Settings that follow ``batch_size`` (none in 2D)."""
        return {}

    def determine_spacing(self) -> list[float]:
        """The median spacing of the images."""
        self.reasons["pixdim"] = "median spacing of the images"
        return [round(float(s), 5) for s in self.fingerprint["spacing"]["median"]]

    def resampled_shapes(self, spacing: Sequence[float]) -> tuple[list[float], float]:
        """The median image shape after resampling to ``spacing``, and the voxels of all images."""
        fp = self.fingerprint
        per_case = fp.get("per_case", {})
        if per_case.get("size"):
            shapes = [
                [sz * sp / t for sz, sp, t in zip(size, sp_case, spacing, strict=True)]
                for size, sp_case in zip(per_case["size"], per_case["spacing"], strict=True)
            ]
            return np.median(np.asarray(shapes), 0).tolist(), float(sum(math.prod(s) for s in shapes))
        sizes, spacings = fp["size"]["median"], fp["spacing"]["median"]
        median_shape = [s * sp / t for s, sp, t in zip(sizes, spacings, spacing, strict=True)]
        return median_shape, math.prod(median_shape) * fp["cases"]

    def determine_strides(self, patch: Sequence[int], spacing: Sequence[float]) -> list[list[int]]:
        """Per level, the stride of each axis (2 or 1): an axis is downsampled while its feature map stays at least
        :attr:`min_feature_size` voxels and its current spacing is less than twice the finest (nnU-Net's rule)."""
        size, current = [float(p) for p in patch], [float(s) for s in spacing]
        strides = []
        for _ in range(self.max_levels):
            finest = min(current)
            axes = [d for d in range(len(size)) if size[d] / 2 >= self.min_feature_size and current[d] / finest < 2]
            if not axes:
                break
            strides.append([2 if d in axes else 1 for d in range(len(size))])
            for d in axes:
                size[d] /= 2
                current[d] *= 2
        return strides

    def fit_patch(
        self, median_shape: Sequence[float], spacing: Sequence[float], max_voxels: float
    ) -> tuple[list[int], list[list[int]]]:
        """A patch covering the median image (after resampling) within ``max_voxels``, shrunk along its physically
        longest axis first, then rounded down to a multiple of the U-Net's total stride on each axis; and the
        strides."""
        patch = [max(float(s), 8.0) for s in median_shape]
        while math.prod(patch) > max_voxels:
            d = int(np.argmax([p * s for p, s in zip(patch, spacing, strict=True)]))
            patch[d] *= 0.9
        rounded = [int(p) for p in patch]
        for _ in range(3):  # rounding can remove a level; settle on strides the rounded patch satisfies
            strides = self.determine_strides(rounded, spacing)
            total = [math.prod(level[d] for level in strides) for d in range(len(rounded))]
            new = [max(t, (p // t) * t) for p, t in zip(rounded, total, strict=True)]
            if new == rounded:
                break
            rounded = new
        return rounded, strides

    def determine_patch_size(
        self, median_shape: Sequence[float], spacing: Sequence[float]
    ) -> tuple[list[int], list[list[int]]]:
        """The patch (:meth:`fit_patch`, at least 2 patches per batch) and the U-Net's strides."""
        patch, strides = self.fit_patch(median_shape, spacing, self.budget["voxels"] / 2)
        shown = "x".join(str(round(s)) for s in median_shape)
        covered = [round(min(1.0, p / s), 2) for p, s in zip(patch, median_shape, strict=True)]
        self.reasons["patch_size"] = (
            f"median image after resampling {shown} voxels; the patch covers {covered} of it per axis, within the "
            f"{self.device} budget of {self.budget['voxels']} voxels per batch of at least 2, a multiple of the "
            "U-Net's total stride"
        )
        return patch, strides

    def determine_batch_size(self, patch: Sequence[int], total_voxels: float) -> int:
        """Volumes per batch: the budget's patches (at least 2, at most :attr:`data_fraction` of the data's
        ``total_voxels`` and :attr:`max_batch`), divided by the patches per volume."""
        patch_voxels = math.prod(patch)
        cap = max(2, math.floor(self.data_fraction * total_voxels / patch_voxels))
        patches = int(min(self.max_batch, cap, max(2, self.budget["voxels"] // patch_voxels)))
        spv = f"; {self.spv} patches per volume" if self.spv > 1 else ""
        self.reasons["batch_size"] = (
            f"{self.budget['voxels']} voxels per batch / {patch_voxels} per patch, at least 2 patches, at most "
            f"{100 * self.data_fraction:g}% of the data's voxels ({cap} patches) and {self.max_batch}{spv}"
        )
        return max(1, patches // self.spv)

    def determine_teacher_channels(self, strides: Sequence[Sequence[int]]) -> list[int]:
        """Channels per U-Net level (``len(strides) + 1``): the device's base at full resolution, doubled per level,
        capped; and why the strides are what they are."""
        base, cap = self.channels[self.device]
        self.reasons["strides"] = (
            f"downsample each axis while its feature map keeps at least {self.min_feature_size} voxels and its "
            f"spacing is under twice the finest (at most {self.max_levels} levels)"
        )
        self.reasons["teacher_channels"] = (
            f"{base} channels at full resolution on {self.device}, doubled per level, at most {cap}"
        )
        return [min(base * 2**i, cap) for i in range(len(strides) + 1)]

    def determine_flip_axes(self) -> list[int]:
        """Flips along every axis but those that separate lateral classes."""
        lateral = self.fingerprint.get("lateral", [])
        lateral_axes = sorted({int(entry["axis"]) for entry in lateral})
        if lateral_axes:
            named = [" / ".join(e["names"]) + f" (axis {e['axis']}, by {' and '.join(e['found_by'])})"
                     for e in lateral]  # fmt: skip
            self.reasons["flip_axes"] = f"no flips along axes {lateral_axes}: lateral classes {'; '.join(named)}"
        else:
            self.reasons["flip_axes"] = "no lateral classes: flips along every axis"
        return [d for d in range(self.dims) if d not in lateral_axes]

    def determine_rotation(self, spacing: Sequence[float]) -> float | list[float]:
        """Rotations of up to 15 degrees."""
        self.reasons["rotate_degrees"] = (
            "small rotations (up to 15 degrees) and scaling (0.8-1.2), probability 0.2 each"
        )
        return 15.0

    def determine_sliding_window(self, patch: Sequence[int]) -> tuple[float, int]:
        """The sliding windows' overlap (by device) and batch (the budget's patches, 1 to :attr:`max_sw_batch`)."""
        overlap = self.sw_overlap[self.device]
        self.reasons["sw_overlap"] = (
            f"sliding windows overlap by {overlap} on {self.device} (0.5 on GPU, 0.25 on CPU for speed)"
        )
        return overlap, int(max(1, min(self.max_sw_batch, self.budget["voxels"] // math.prod(patch))))


class SegmentationPlanner3D(SegmentationPlanner):
    """3D segmentation: as 2D, with nnU-Net's spacing for thick slices, rotations about the coarse axis only for
    anisotropic spacing, 2 patches per volume and at most 5 downsamplings."""

    max_levels = 5
    samples_per_volume = 2

    def extra_batch_settings(self) -> dict[str, Any]:
        """``samples_per_volume``: patches cropped per volume and iteration."""
        return {"samples_per_volume": self.spv}

    def determine_spacing(self) -> list[float]:
        """The median spacing; for an axis much coarser than the others with few voxels along it, the 10th
        percentile of its spacings instead (nnU-Net), so that thick slices are not interpolated into many thin
        ones."""
        fp = self.fingerprint
        spacing = [float(s) for s in fp["spacing"]["median"]]
        self.reasons["pixdim"] = "median spacing of the images"
        size = [float(s) for s in fp["size"]["median"]]
        worst = int(np.argmax(spacing))
        others = [d for d in range(3) if d != worst]
        aniso_spacing = spacing[worst] > ANISOTROPY * min(spacing[d] for d in others)
        aniso_voxels = size[worst] * ANISOTROPY < min(size[d] for d in others)
        if aniso_spacing and aniso_voxels:
            p10 = float(fp["spacing"]["percentile_10"][worst])
            spacing[worst] = max(p10, max(spacing[d] for d in others) + 1e-5)
            self.reasons["pixdim"] = (
                f"median spacing; axis {worst} is anisotropic (over {ANISOTROPY:g}x coarser, few voxels): the 10th "
                "percentile of its spacings (nnU-Net)"
            )
        return [round(s, 5) for s in spacing]

    def determine_rotation(self, spacing: Sequence[float]) -> float | list[float]:
        """Rotations of up to 15 degrees; about the coarsest axis only when the spacing is anisotropic."""
        if max(spacing) <= ANISOTROPY * min(spacing):
            return super().determine_rotation(spacing)
        worst = int(np.argmax(spacing))
        self.reasons["rotate_degrees"] = f"anisotropic spacing: rotations of up to 15 degrees about axis {worst} only"
        return [15.0 if d == worst else 0.0 for d in range(3)]


class ClassificationPlanner(Planner):
    """Classification: image size and batch within the budget, lateral findings, balanced sampling.

    Args:
        lateral: the findings are lateralised (no left-right flips); default: a class name holds a side word.
        fingerprint, device, voxel_budget, total_iterations: see :class:`Planner`.
    """

    task = "classification"
    budgets = {**Planner.budgets, "cuda": {"voxels": 2**22, "iterations": 10_000}}
    epochs = (10, 200)
    min_batch: ClassVar[int] = 8
    network_stride: ClassVar[int] = 32  # the classifiers downsample by 32

    def __init__(self, fingerprint: Mapping[str, Any], lateral: bool | None = None, **budget: Any):
        super().__init__(fingerprint, **budget)
        self.lateral = lateral

    def plan(self) -> tuple[dict[str, Any], dict[str, str]]:
        in_channels = self.determine_in_channels()
        normalization = self.determine_normalization()
        patch_size = self.determine_patch_size()
        batch = self.determine_batch_size(patch_size)
        lateral = self.determine_lateral()
        flips = self.determine_flip_axes(lateral)
        self.reasons["rotate_degrees"] = (
            "small rotations (up to 15 degrees) and scaling (0.9-1.1), probability 0.2 each"
        )
        epochs = self.determine_epochs(batch)
        balanced = self.determine_balanced_sampling()
        settings = {
            "in_channels": in_channels,
            "patch_size": patch_size,
            "batch_size": batch,
            **epochs,
            "lateral": lateral,
            "flip_axes": flips,
            "rot90_axes": None,
            "rotate_degrees": 15.0,
            "scale_range": 0.1,
            "intensity_augmentation": True,
            "balanced_sampling": balanced,
            "normalization": normalization,
        }
        return settings, self.reasons

    def determine_patch_size(self) -> list[int]:
        """The median image, scaled to fit at least :attr:`min_batch` images in the budget, rounded to a multiple
        of :attr:`network_stride`."""
        median = [float(s) for s in self.fingerprint["size"]["median"]]
        size = list(median)
        while math.prod(size) > self.budget["voxels"] / self.min_batch:
            size = [s * 0.9 for s in size]
        stride = self.network_stride
        self.reasons["patch_size"] = (
            f"median image {'x'.join(str(round(s)) for s in median)}, scaled to fit {self.budget['voxels']} pixels "
            f"per batch of at least {self.min_batch} and rounded to a multiple of {stride} (the networks downsample "
            f"by {stride})"
        )
        return [max(stride, int(round(s / stride)) * stride) for s in size]

    def determine_batch_size(self, patch_size: Sequence[int]) -> int:
        """The budget's images, :attr:`min_batch` to :attr:`max_batch`, at most a quarter of the training list."""
        pixels = math.prod(patch_size)
        low, high = self.min_batch, self.max_batch
        self.reasons["batch_size"] = f"{self.budget['voxels']} pixels per batch / {pixels} per image, {low} to {high}"
        return int(min(high, max(low, self.budget["voxels"] // pixels), max(low, self.n_train // 4)))

    def determine_lateral(self) -> bool:
        """Lateralised findings: as given, else whether a class name holds a side word."""
        named = list(self.fingerprint.get("lateral", []))
        self.reasons["lateral"] = (
            f"class names with a side ({', '.join(n for e in named for n in e['names'])}): lateralised findings"
            if named
            else "no class name holds a side word; pass --lateral True for lateralised findings"
        )
        return bool(named) if self.lateral is None else bool(self.lateral)

    def determine_flip_axes(self, lateral: bool) -> list[int]:
        """Every axis: the bundle leaves axis 0 out while ``lateral`` is true (:func:`medkd.planning.lateral_flips`)."""
        self.reasons["flip_axes"] = (
            "flips along every axis, but the bundle leaves out the left-right axis 0 while `lateral` is true"
            + (" (it is)" if lateral else "")
        )
        return list(range(self.dims))

    def determine_balanced_sampling(self) -> bool:
        """Whether to draw every class equally often (:mod:`medkd.data.balance`): when the training list's most
        common class has at least :data:`IMBALANCE` times the samples of its rarest."""
        counts = {c["name"]: int(c.get("samples", 0)) for c in self.fingerprint.get("classes", [])}
        present = {name: n for name, n in counts.items() if n}
        if len(present) < 2:
            self.reasons["balanced_sampling"] = "fewer than two classes among the samples read: nothing to balance"
            return False
        common, rare = max(present, key=present.get), min(present, key=present.get)
        ratio = present[common] / present[rare]
        if ratio < IMBALANCE:
            self.reasons["balanced_sampling"] = (
                f"classes within {IMBALANCE:g}x of each other ({common} {ratio:.3g}x {rare}): uniform sampling"
            )
            return False
        self.reasons["balanced_sampling"] = (
            f"imbalanced classes ({common} {ratio:.3g}x as many samples as {rare} in the lists read, at least "
            f"{IMBALANCE:g}x): each class drawn equally often, so that the rare classes are not traded for accuracy on "
            "the common ones"
        )
        return True


def make_planner(
    fingerprint: Mapping[str, Any],
    task: str = "segmentation",
    device: Any = "cpu",
    voxel_budget: int | None = None,
    total_iterations: int | None = None,
    samples_per_volume: int | None = None,
    lateral: bool | None = None,
) -> Planner:
    """The planner of ``task`` for a fingerprint (arguments: see :func:`make_settings`)."""
    budget = {"device": device, "voxel_budget": voxel_budget, "total_iterations": total_iterations}
    if task == "classification":
        return ClassificationPlanner(fingerprint, lateral=lateral, **budget)
    if task != "segmentation":
        raise ConfigError(f"task {task!r} must be 'segmentation' or 'classification'.")
    planner = SegmentationPlanner3D if int(fingerprint["spatial_dims"]) == 3 else SegmentationPlanner
    return planner(fingerprint, samples_per_volume=samples_per_volume, **budget)


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
        voxel_budget: voxels of one training batch (default: the planner's ``budgets``).
        total_iterations: training iterations per stage (default: the planner's ``budgets``).
        samples_per_volume: patches cropped per volume and iteration (segmentation; default 1 in 2D, 2 in 3D).
        lateral: classification only: the findings are lateralised (no left-right flips); default: a class name
            holds a side word.
    """
    return make_planner(
        fingerprint, task, device, voxel_budget, total_iterations, samples_per_volume=samples_per_volume,
        lateral=lateral,
    ).plan()  # fmt: skip
