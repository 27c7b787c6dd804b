"""Non-finite (NaN/Inf) input images: counted by ``check-data``, and stopped right after loading.

* :func:`count_nonfinite` counts the NaN/Inf values of an image (``check-data`` and
  :func:`medkd.data.checks.check_datalist` report them per file).
* :class:`CheckFinited` stops a pipeline with a :class:`~medkd.errors.DataError` naming the file when a loaded
  image holds NaN/Inf; :func:`with_finite_check` inserts it after the loader of a bundle's ``load`` list. Inference's
  :class:`~medkd.data.skipping.SafeDataset` then skips the file and lists it in ``skipped.tsv``; evaluation stops.

Non-finite losses and network outputs are the training layer's (:mod:`medkd.training.nonfinite`).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import LoadImaged, MapTransform
from monai.utils import ImageMetaKey
from monai.utils.enums import CommonKeys as Keys

from medkd.data.loading import DataError, LoadMedicalImaged
from medkd.errors import ConfigError

__all__ = ["CheckFinited", "count_nonfinite", "nonfinite_message", "with_finite_check"]


def count_nonfinite(array: Any) -> int:
    """Number of NaN/Inf values of a tensor or array (0 for integer data, which cannot hold them)."""
    if isinstance(array, torch.Tensor):
        data = array.as_tensor() if hasattr(array, "as_tensor") else array
        if not (data.is_floating_point() or data.is_complex()):
            return 0
        return int((~torch.isfinite(data)).sum())
    data = np.asarray(array)
    if not np.issubdtype(data.dtype, np.inexact):
        return 0
    return int(np.count_nonzero(~np.isfinite(data)))


def _filename(data: Any, key: Hashable) -> str:
    """The file (or files, for a multi-channel input) of one loaded image."""
    meta = getattr(data, "meta", None)
    names = meta.get(ImageMetaKey.FILENAME_OR_OBJ) if isinstance(meta, Mapping) else None
    if isinstance(names, list | tuple):
        return ", ".join(str(x) for x in names)
    return str(names) if names else f"the '{key}' of this item"


def nonfinite_message(what: str, count: int, total: int) -> str:
    return (
        f"{what} has {count} non-finite value(s) (NaN or Inf) out of {total}. Replace them with a number and save "
        "the file again (e.g. numpy.nan_to_num(array)), or remove the file from the list"
    )


class CheckFinited(MapTransform):
    """Raise :class:`~medkd.data.loading.DataError` naming the file when an image of ``keys`` holds NaN/Inf.

    Place it right after the loader (see :func:`with_finite_check`), so the count is that of the file. Integer
    images pass without a scan.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> Mapping[Hashable, Any]:
        for key in self.key_iterator(dict(data)):
            value = data[key]
            count = count_nonfinite(value)
            if count:
                name = _filename(value, key)
                kind = "Image file" if key == Keys.IMAGE else f"'{key}' file"
                total = int(np.prod(value.shape))
                raise DataError(nonfinite_message(f"{kind} '{name}'", count, total) + ".")
        return data


def with_finite_check(transforms: Sequence[Any]) -> list[Any]:
    """``transforms`` with a :class:`CheckFinited` (same keys) right after its first loader (``LoadMedicalImaged``
    or ``LoadImaged``). In a bundle: ``"transforms": "$medkd.data.finite.with_finite_check(@load)"``.

    Raises:
        ConfigError: the list has no loader.
    """
    items = list(getattr(transforms, "transforms", transforms))
    for i, t in enumerate(items):
        if isinstance(t, LoadMedicalImaged | LoadImaged):
            guard = CheckFinited(t.keys, allow_missing_keys=t.allow_missing_keys)
            return [*items[: i + 1], guard, *items[i + 1 :]]
    raise ConfigError(
        "with_finite_check: the transform list has no LoadMedicalImaged/LoadImaged to check after; pass the "
        "bundle's 'load' list (loader first)."
    )
