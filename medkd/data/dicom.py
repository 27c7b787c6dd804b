"""DICOM reading: :class:`DicomReader`, MONAI's pydicom reader hardened for real-world files and series folders,
and how a file is recognised as DICOM without a suffix (:func:`sniff_dicom`)."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import PydicomReader
from monai.data.utils import affine_to_spacing
from monai.utils import MetaKeys, ensure_tuple

from medkd.errors import DataError

__all__ = ["DICOM_SUFFIXES", "DicomReader", "is_dicom_file", "sniff_dicom"]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")


def is_dicom_file(path: Path) -> bool:
    """Whether the file ``path`` is DICOM: by its suffix, or by its content (PACS exports name files ``IM0001``)."""
    return path.name.lower().endswith(DICOM_SUFFIXES) or sniff_dicom(path)


def _normal(iop: Sequence[float]) -> np.ndarray:
    row, col = np.asarray(iop[:3], dtype=float), np.asarray(iop[3:6], dtype=float)
    return np.cross(row, col)


def _functional_group(ds: Any, frame: int, sequence: str, attr: str) -> Any:
    """Read ``attr`` of an enhanced multi-frame functional group, per-frame first then shared; None if absent."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        try:
            value = getattr(getattr(ds, groups)[index], sequence)[0].get(attr)
        except (AttributeError, IndexError):
            continue
        if value is not None:
            return value
    return None


GAP = 1.5  # a DICOM series whose slices are this many times further apart somewhere than their median step has a gap


class DicomReader(PydicomReader):
    """:class:`monai.data.PydicomReader` hardened for real-world files.

    Differences with the MONAI reader (pydicom does the decoding in both):

    * files without the 128-byte preamble or without file meta are read (``force=True`` by default, and the
      transfer syntax pydicom detected is recorded so the pixels can be decoded);
    * a folder is one series: non-DICOM files are ignored, slices are sorted by their position along the slice
      normal (MONAI sorts by ``InstanceNumber``) and the slice spacing comes from ``ImagePositionPatient``; a
      folder holding several series raises :class:`DataError`;
    * multi-frame files are returned as ``(columns, rows, frames)`` (MONAI puts frames on the 2nd axis) with the
      frame spacing taken from ``GridFrameOffsetVector`` (RT dose) or the enhanced functional groups.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("force", True)
        super().__init__(**kwargs)

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        return all(Path(f).is_dir() or is_dicom_file(Path(f)) for f in ensure_tuple(filename))

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs: Any):
        names = ensure_tuple(data)
        if len(names) == 1 and Path(names[0]).is_dir():
            return self._read_series_folder(Path(names[0]), **kwargs)
        if any(Path(n).is_dir() for n in names):
            raise DataError(f"Several DICOM folders given as one image ({names}); list one series folder per key.")
        result = super().read(data, **kwargs)
        for ds in result if isinstance(result, list) else [result]:
            _ensure_transfer_syntax(ds)
        return result

    def _read_series_folder(self, folder: Path, **kwargs: Any):
        import pydicom

        options = {**self.kwargs, **kwargs}
        datasets, files = [], []
        for f in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
            if not sniff_dicom(f):
                continue
            try:
                ds = pydicom.dcmread(f, **options)
            except Exception as e:  # corrupt slice: name it rather than silently building a volume with a hole
                raise DataError(f"DICOM slice '{f}' in series folder '{folder}' cannot be read ({e}).") from e
            if "PixelData" in ds:  # skips DICOMDIR, structured reports, ...
                datasets.append(_ensure_transfer_syntax(ds))
                files.append(str(f))
        if not datasets:
            raise DataError(
                f"DICOM folder '{folder}' contains no DICOM image slices. Point the datalist at a folder holding "
                "the .dcm files of one series."
            )
        series = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
        if len(series) > 1:
            raise DataError(
                f"DICOM folder '{folder}' mixes {len(series)} series (SeriesInstanceUID). Move each series into its "
                "own folder and list the folders separately."
            )
        self.filenames = [files] if len(files) > 1 else files
        self.has_series = len(datasets) > 1
        return datasets if len(datasets) > 1 else datasets[0]

    def get_data(self, data: Any):
        array, meta = super().get_data(data)
        datasets = data if isinstance(data, list) else [data]
        colour = len(datasets) == 1 and not isinstance(datasets[0], list) and "SegmentSequence" not in datasets[0]
        if colour and int(datasets[0].get("SamplesPerPixel", 1)) > 1 and self._num_frames(datasets[0]) <= 1:
            # a colour image (ultrasound, photograph, slide): its samples are channels, not a third axis
            meta[MetaKeys.SPATIAL_SHAPE] = tuple(meta[MetaKeys.SPATIAL_SHAPE])[:-1]
            meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = -1
            meta["spacing"] = affine_to_spacing(meta[MetaKeys.ORIGINAL_AFFINE], r=2)
        return array, meta

    def _combine_dicom_series(self, data: Sequence, filenames: Sequence[PathLike]):
        slices, names = list(data), [str(f) for f in filenames]
        iop = slices[0].get("ImageOrientationPatient")
        if all("ImagePositionPatient" in s for s in slices) and iop is not None:
            normal = _normal(iop)
            pos = np.array([float(np.dot(normal, np.asarray(s.ImagePositionPatient, dtype=float))) for s in slices])
        else:
            warnings.warn(
                f"DICOM series '{os.path.dirname(names[0])}' lacks ImagePositionPatient/ImageOrientationPatient; "
                "slices are ordered by InstanceNumber and the slice spacing is unknown.",
                stacklevel=2,
            )
            pos = np.array([float(s.get("InstanceNumber", i) or i) for i, s in enumerate(slices)])
        order = np.argsort(pos, kind="stable")
        steps = np.diff(pos[order])
        if np.any(np.isclose(steps, 0.0)):
            dup = [names[order[i]] for i in np.flatnonzero(np.isclose(steps, 0.0))[:3]]
            raise DataError(
                f"DICOM series in '{os.path.dirname(names[0])}' has several slices at the same position (e.g. {dup}): "
                "it probably mixes acquisitions or echoes. Keep one slice per position in the folder."
            )
        if steps.size and steps.max() > GAP * np.median(steps):
            at = int(np.argmax(steps))
            raise DataError(
                f"DICOM series in '{os.path.dirname(names[0])}' has a gap: {os.path.basename(names[order[at]])} and "
                f"{os.path.basename(names[order[at + 1]])} are {steps[at]:.3g} mm apart, the other slices "
                f"{np.median(steps):.3g} mm (a missing slice?). On one regular grid the slices, and a segmentation, "
                "would be misplaced. Add the missing slices, or convert the series to NIfTI (e.g. dcm2niix)."
            )
        if steps.size and not np.allclose(steps, steps[0], rtol=0.05, atol=1e-3):
            logger.warning(
                "DICOM series '%s' has uneven slice spacing %s; the mean spacing is used.",
                os.path.dirname(names[0]),
                np.unique(steps.round(3)),
            )
        arrays = [self._get_array_data(slices[i], names[i]) for i in order]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise DataError(
                f"DICOM series in '{os.path.dirname(names[0])}' has slices of different sizes {sorted(shapes)}. "
                "Keep only the slices of one series in the folder."
            )
        first, last = slices[order[0]], slices[order[-1]]
        meta = self._get_meta_dict(first)
        meta["spacing"] = np.asarray([*(first.get("PixelSpacing") or [1.0, 1.0])][:2], dtype=float)
        if "ImagePositionPatient" in last and "00200032" in meta:
            meta["lastImagePositionPatient"] = np.asarray(last.ImagePositionPatient, dtype=float)
        meta[MetaKeys.SPATIAL_SHAPE] = arrays[0].shape + (len(arrays),)
        return np.stack(arrays, axis=-1), meta

    @staticmethod
    def _num_frames(img: Any) -> int:
        try:
            return int(img.get("NumberOfFrames", 1) or 1)
        except (TypeError, ValueError):
            return 1

    def _get_array_data(self, img, filename):
        data = super()._get_array_data(img, filename)
        if str(img.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
            data = _as_monochrome2(img, data)
        if self._num_frames(img) > 1 and "SegmentSequence" not in img:
            data = np.moveaxis(data, 0, 2)  # (frames, rows, cols[, samples]) -> (rows, cols, frames[, samples])
        return data

    def _get_meta_dict(self, img) -> dict:
        meta = super()._get_meta_dict(img)
        frames = self._num_frames(img)
        if frames <= 1 or "SegmentSequence" in img or int(img.get("SamplesPerPixel", 1)) != 1:
            return meta
        # enhanced multi-frame: geometry lives in the functional groups
        for tag, vr, seq, attr, frame in (
            ("00200037", "DS", "PlaneOrientationSequence", "ImageOrientationPatient", 0),
            ("00200032", "DS", "PlanePositionSequence", "ImagePositionPatient", 0),
            ("00280030", "DS", "PixelMeasuresSequence", "PixelSpacing", 0),
        ):
            value = _functional_group(img, frame, seq, attr)
            if tag not in meta and value is not None:
                meta[tag] = {"vr": vr, "Value": [float(v) for v in value]}
        if "00200032" not in meta or "00200037" not in meta:
            return meta
        first = np.asarray(meta["00200032"]["Value"], dtype=float)
        last_pos = _functional_group(img, frames - 1, "PlanePositionSequence", "ImagePositionPatient")
        offsets = img.get("GridFrameOffsetVector")
        if last_pos is not None and "PerFrameFunctionalGroupsSequence" in img:
            meta["lastImagePositionPatient"] = np.asarray(last_pos, dtype=float)
        elif offsets is not None and len(offsets) == frames:
            step = float(offsets[-1]) - float(offsets[0])
            meta["lastImagePositionPatient"] = first + _normal(meta["00200037"]["Value"]) * step
        else:
            thickness = float(img.get("SpacingBetweenSlices") or img.get("SliceThickness") or 1.0)
            meta["lastImagePositionPatient"] = first + _normal(meta["00200037"]["Value"]) * thickness * (frames - 1)
        return meta


def _as_monochrome2(ds: Any, data: np.ndarray) -> np.ndarray:
    """A MONOCHROME1 image (the lowest value white: radiographs kept as on film) in the sense of every other image
    (MONOCHROME2: the highest value white). Each value ``v`` becomes ``lo + hi - v``, with ``lo..hi`` the range its
    stored bits hold, after the rescale slope and intercept; integers stay integers of the same type."""
    bits = int(ds.get("BitsStored") or 16)
    signed = int(ds.get("PixelRepresentation") or 0) == 1
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    lo, hi = sorted((lo * slope + intercept, hi * slope + intercept))
    if np.issubdtype(data.dtype, np.integer):
        return (int(lo + hi) - data.astype(np.int64)).astype(data.dtype)
    return (lo + hi - data).astype(np.float32)


def _ensure_transfer_syntax(ds: Any) -> Any:
    """Give a dataset read without file meta (no preamble, raw dataset) the transfer syntax pydicom detected, so
    that ``pixel_array`` can decode it; MONAI's reader fails on such files."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return ds
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None:
        return ds
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = (
        ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    )
    return ds


def sniff_dicom(path: Path) -> bool:
    """True when ``path`` looks like DICOM: 'DICM' at byte 128, or a preamble-less file starting with a group
    0002/0008 tag (little or big endian)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM" or head[:2] in (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08")
