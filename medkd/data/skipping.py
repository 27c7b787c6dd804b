"""Inference that skips the files it cannot use: unreadable or corrupt files, and images holding NaN/Inf.

An inference stage reads its images through :class:`SafeDataset` (an item whose loading or transforms fail becomes
``None``, and the file and the reason go to ``report_file``, the stage's ``skipped.tsv``), batches them with
:func:`skip_none_collate`, lets its evaluator pass over a batch of unusable files only (:func:`skip_empty_batches`)
and logs what was skipped at the end (:class:`SkippedFilesReport`). Non-finite images fail in the loading chain
through :func:`medkd.data.finite.with_finite_check`, so they are skipped the same way. Evaluation does not skip:
its
test list is checked before it starts (:func:`medkd.data.checks.check_before_run`).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events
from monai.config import KeysCollection
from monai.data import Dataset, list_data_collate
from monai.transforms import MapTransform
from monai.utils import ImageMetaKey

from medkd.data.cases import NameAfterCase
from medkd.data.checks import Problem, error_reason
from medkd.data.finite import CheckFinited, with_finite_check
from medkd.data.formats import reader_kind
from medkd.data.loading import DropUnitAxesd
from medkd.errors import DataError

__all__ = [
    "SafeDataset",
    "SpatialDimsd",
    "InputChannelsd",
    "inference_loading",
    "skip_none_collate",
    "skip_empty_batches",
    "SkippedFilesReport",
]

logger = logging.getLogger(__name__)


class SafeDataset(Dataset):
    """:class:`monai.data.Dataset` whose items are ``None`` when loading or transforming them fails.

    Each failure is logged with the file path and appended to ``report_file`` (a tab-separated file shared
    by DataLoader workers), so :attr:`skipped` and :meth:`summary` work with any ``num_workers``.
    Use with :func:`skip_none_collate`, and skip a batch that collates to ``None`` (all its items failed).
    """

    def __init__(
        self,
        data: Sequence,
        transform: Callable | None = None,
        image_key: str = "image",
        report_file: str | os.PathLike | None = None,
    ) -> None:
        super().__init__(data, transform)
        self.image_key = image_key
        if report_file is None:
            fd, report_file = tempfile.mkstemp(prefix="medkd_skipped_", suffix=".tsv")
            os.close(fd)
        else:
            Path(report_file).parent.mkdir(parents=True, exist_ok=True)
            Path(report_file).write_text("")
        self.report_file = str(report_file)

    def _path(self, index: int) -> str:
        item = self.data[index]
        if isinstance(item, Mapping) and self.image_key in item:
            return str(item[self.image_key])
        return str(item) if isinstance(item, str | os.PathLike) else f"item {index}"

    def _transform(self, index: int) -> Any:
        try:
            return super()._transform(index)
        except Exception as e:  # noqa: BLE001 - any failure of one item must not stop the run
            path, reason = self._path(index), error_reason(e)
            logger.warning("Skipping %s: %s", path, reason)
            with open(self.report_file, "a") as f:
                f.write(f"{path}\t{reason}\n")
            return None

    @property
    def skipped(self) -> list[Problem]:
        """Items skipped so far (in any worker), each path once."""
        found: dict[str, Problem] = {}
        with open(self.report_file) as f:
            for line in f:
                path, _, reason = line.rstrip("\n").partition("\t")
                found.setdefault(path, Problem(path, reason))
        return list(found.values())

    def summary(self) -> str:
        """One line when nothing was skipped, else the number and list of skipped files."""
        skipped = self.skipped
        if not skipped:
            return f"All {len(self)} item(s) loaded; none skipped."
        return "\n".join([f"Skipped {len(skipped)} of {len(self)} item(s):", *[f"  - {p}" for p in skipped]])


class SpatialDimsd(DropUnitAxesd):
    """:class:`~medkd.data.loading.DropUnitAxesd`, then :class:`~medkd.data.loading.DataError` naming the file when a
    loaded (channel-first) image of ``keys`` still has other spatial dimensions than the networks take
    (``spatial_dims``): a DICOM slice, a photo or a 2D file among 3D inputs, or a volume among 2D ones. Place it right
    after the loader (:func:`inference_loading`)."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = super().__call__(data)
        for key in self.key_iterator(d):
            dims = d[key].ndim - 1
            if dims == self.spatial_dims:
                continue
            path = str(getattr(d[key], "meta", {}).get(ImageMetaKey.FILENAME_OR_OBJ, key))
            hint = ""
            if dims < self.spatial_dims and reader_kind(path, check_exists=False) == "dicom":
                hint = (
                    "; a DICOM series is read from its folder: put each series' slices in a sub-folder of --input_dir "
                    "(a folder of slices given as --input_dir is read slice by slice)"
                )
            raise DataError(f"'{path}' is {dims}D but the networks take {self.spatial_dims}D images{hint}.")
        return d


class InputChannelsd(MapTransform):
    """:class:`~medkd.data.loading.DataError` naming the file when a loaded (channel-first) image of ``keys`` has
    another number of channels than the networks take (``in_channels``): a 3-channel volume among 1-channel ones. Place
    it after the bundle's ``load``, which converts pictures (:class:`~medkd.data.channels.MatchChannelsd`)."""

    def __init__(self, keys: KeysCollection, in_channels: int, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.in_channels = int(in_channels)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if (channels := int(d[key].shape[0])) != self.in_channels:
                path = str(getattr(d[key], "meta", {}).get(ImageMetaKey.FILENAME_OR_OBJ, key))
                raise DataError(f"'{path}' has {channels} channel(s) but the networks take {self.in_channels}.")
        return d


def inference_loading(
    load: Sequence[Callable], spatial_dims: int, in_channels: int | None = None, key: str = "image"
) -> list[Callable]:
    """A bundle's ``load`` transforms for inference: right after the loader, the checks that make a file unusable
    (non-finite values, :func:`~medkd.data.finite.with_finite_check`; other spatial dimensions,
    :class:`SpatialDimsd`), and after ``load``, other channels than ``in_channels`` (:class:`InputChannelsd`), so
    that :class:`SafeDataset` skips such a file with its reason; at the end, the image named after its case
    (:class:`~medkd.data.cases.NameAfterCase`), which the outputs are named after."""
    items = with_finite_check(load)
    after = 1 + next(i for i, t in enumerate(items) if isinstance(t, CheckFinited))
    channels = [] if in_channels is None else [InputChannelsd(key, in_channels)]
    return [*items[:after], SpatialDimsd(key, spatial_dims), *items[after:], *channels, NameAfterCase(key)]


def skip_none_collate(batch: Sequence[Any]) -> Any:
    """``list_data_collate`` without the ``None`` items of :class:`SafeDataset`; ``None`` when none is left."""
    kept = [item for item in batch if item is not None]
    return list_data_collate(kept) if kept else None


def skip_empty_batches(engine: Engine, batchdata: Any) -> dict:
    """``iteration_update`` for evaluators fed through :func:`skip_none_collate`: a batch whose files
    were all unreadable (``None``) is skipped instead of stopping the run."""
    return {} if batchdata is None else engine._iteration(engine, batchdata)


class SkippedFilesReport:
    """At the end of a run, log which files a :class:`SafeDataset` skipped (or that none was)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def attach(self, engine: Engine) -> None:
        """Report when ``engine`` completes."""
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        level = logging.WARNING if self.dataset.skipped else logging.INFO
        logger.log(level, "%s (list: %s)", self.dataset.summary(), self.dataset.report_file)
