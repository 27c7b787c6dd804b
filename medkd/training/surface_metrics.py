"""Surface metrics of a segmentation, scored at the evaluate stage beside Dice: MONAI's 95th-percentile Hausdorff
distance (HD95) and normalised surface Dice (NSD), without the background, in the images' physical unit
(millimetres for most scans, micrometres for the embedded SEM images) from the spacing in each label map's affine,
i.e. the bundle's ``pixdim`` after its resampling.

Where a class is in neither the label map nor the prediction, both are NaN (no score, as Dice). Where it is in only
one of them (a missed class, or one predicted where the label has none), HD95 is ``inf`` (no surface to measure to)
and NSD is 0; HD95's mean (``aggregate``) leaves out the ``inf`` values, and :class:`medkd.tools.report.ResultsTable`
counts them in ``results.md``."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.metrics import HausdorffDistanceMetric, SurfaceDiceMetric
from monai.metrics.utils import do_metric_reduction

from medkd.errors import ConfigError

__all__ = ["label_spacing", "surface_tolerances", "HD95Metric", "NSDMetric"]

HD95_PERCENTILE = 95
EMPTY_MASK_WARNING = r"the (prediction|ground truth) of class .* is all 0"  # MONAI's, for every missed class


def label_spacing(label: torch.Tensor) -> list[list[float]] | None:
    """The pixel or voxel spacing of each image of a batch of one-hot label maps ``(B, C, *spatial)``, from their
    affine (a :class:`~monai.data.MetaTensor`'s); ``None`` for a plain tensor, which MONAI measures in pixels."""
    if not isinstance(label, MetaTensor):
        return None
    spatial_dims = label.ndim - 2
    affines = label.affine.reshape(-1, *label.affine.shape[-2:])
    return [affine_to_spacing(affine, r=spatial_dims).tolist() for affine in affines]


def surface_tolerances(
    tolerance: float | Sequence[float] | None, pixdim: float | Sequence[float], class_names: Sequence[str]
) -> list[float]:
    """The NSD tolerance of each of ``class_names`` (the foreground classes) in the images' unit: ``tolerance`` (the
    bundle's ``surface_tolerance_mm``: one number for every class, or one per class), or when ``None`` one pixel or
    voxel of the coarsest axis of ``pixdim``, the smallest boundary shift that the resampled grid can show."""
    if tolerance is None:
        tolerance = max(pixdim) if isinstance(pixdim, Sequence) else pixdim
    values = list(tolerance) if isinstance(tolerance, Sequence) else [tolerance] * len(class_names)
    if len(values) != len(class_names) or not all(isinstance(v, (int, float)) and v > 0 for v in values):
        raise ConfigError(
            f"surface_tolerance_mm: got {tolerance!r}; give one positive distance in the unit of pixdim (mm for most "
            f"scans) for every class, or one per foreground class {list(class_names)}, or null for one voxel of pixdim."
        )
    return [float(v) for v in values]


def _spaced(compute: Any, y_pred: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """``compute(y_pred, y)`` with the label's spacing (MONAI's metric handlers pass none), without MONAI's warning
    for each empty mask (an expected case, reported in ``results.md``)."""
    kwargs.setdefault("spacing", label_spacing(y))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=EMPTY_MASK_WARNING)
        return compute(y_pred, y, **kwargs)


class HD95Metric(HausdorffDistanceMetric):
    """MONAI's symmetric 95th-percentile Hausdorff distance of each foreground class, in the label's physical unit;
    ``inf`` where only one of the prediction and the label has the class, NaN where neither has it. Its
    ``aggregate`` (the network's score) is the mean of the finite values."""

    def __init__(self) -> None:
        super().__init__(include_background=False, percentile=HD95_PERCENTILE)

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        distances = _spaced(super()._compute_tensor, y_pred, y, **kwargs)
        one_sided = y_pred[:, 1:].flatten(2).any(-1) != y[:, 1:].flatten(2).any(-1)  # MONAI reports them as NaN
        return distances.masked_fill(one_sided.to(distances.device), math.inf)

    def aggregate(self, reduction: Any = None) -> Any:
        """The mean (or ``reduction``) of the finite distances; ``inf`` and NaN are left out."""
        data = self.get_buffer()
        finite = torch.where(torch.isfinite(data), data, torch.full_like(data, math.nan))
        f, not_nans = do_metric_reduction(finite, reduction or self.reduction)
        return (f, not_nans) if self.get_not_nans else f


class NSDMetric(SurfaceDiceMetric):
    """MONAI's normalised surface Dice of each foreground class, at the tolerances ``class_thresholds`` (one per
    class, in the label's physical unit, :func:`surface_tolerances`): the share of both surfaces within that distance
    of the other; 0 where only one of the prediction and the label has the class, NaN where neither has it."""

    def __init__(self, class_thresholds: Sequence[float]) -> None:
        super().__init__(class_thresholds=list(class_thresholds), include_background=False)

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return _spaced(super()._compute_tensor, y_pred, y, **kwargs)
