"""The image formats medkd reads, as one table: :data:`FORMATS`, one row (:class:`ImageFormat`) per format.

A path's format is found by :func:`format_of`: a folder is read by the row that reads folders (a DICOM series), a file
by its suffix, else by the row that recognises its content (``sniff``: DICOM files without a suffix). The loaders
(:class:`~medkd.data.loading.LoadMedicalImage`), the search of input folders (:func:`is_image_file`), the users'
messages (:data:`SUPPORTED`) and the datalists' label paths all read this table.

Adding a data format is one row: its ``kind``, its ``suffixes``, the MONAI :class:`~monai.data.ImageReader` that reads
it (with its settings in ``reader_kwargs`` of :class:`~medkd.data.loading.LoadMedicalImage`) and how the messages
name it, plus a test that loads a small file of it (``tests/test_data.py``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monai.data import NibabelReader, NumpyReader, PILReader
from monai.data.image_reader import ImageReader

from medkd.data.dicom import DICOM_SUFFIXES, DicomReader, sniff_dicom
from medkd.errors import DataError

__all__ = [
    "FORMATS",
    "IMAGE_SUFFIXES",
    "ImageFormat",
    "SUPPORTED",
    "format_of",
    "is_image_file",
    "is_image_folder",
    "reader_for",
    "reader_kind",
    "suffix_kind",
]

PathLike = str | os.PathLike


@dataclass(frozen=True)
class ImageFormat:
    """One format the loaders read.

    Attributes:
        kind: its name in the code (``"nifti"``, ``"dicom"``, ...), the key of ``reader_kwargs``.
        described: how the users' messages name it.
        suffixes: the file name endings it is recognised by (lower case).
        reader: the MONAI reader class that reads it.
        sniff: recognises a file of the format without a known suffix by its content; the format of such a row is
            also taken for a path that does not exist yet.
        folders: a folder is one image of this format (a DICOM series).
    """

    kind: str
    described: str
    suffixes: tuple[str, ...]
    reader: type[ImageReader]
    sniff: Callable[[Path], bool] | None = None
    folders: bool = False


FORMATS: dict[str, ImageFormat] = {
    row.kind: row
    for row in (
        ImageFormat("nifti", "NIfTI (.nii, .nii.gz)", (".nii", ".nii.gz"), NibabelReader),
        ImageFormat(
            "dicom",
            "DICOM (.dcm/.dicom/.ima, extension-less files, or a folder with one series)",
            DICOM_SUFFIXES,
            DicomReader,
            sniff=sniff_dicom,
            folders=True,
        ),
        ImageFormat("pil", "PNG/JPEG/BMP", (".png", ".jpg", ".jpeg", ".bmp"), PILReader),
        ImageFormat("numpy", "NumPy (.npy/.npz)", (".npy", ".npz"), NumpyReader),
    )
}
SUPPORTED = ", ".join(row.described for row in FORMATS.values())
IMAGE_SUFFIXES = tuple(suffix for row in FORMATS.values() for suffix in row.suffixes)


def suffix_kind(path: PathLike) -> str | None:
    """The kind of the format whose suffix ``path`` has, or ``None``."""
    name = Path(path).name.lower()
    return next((row.kind for row in FORMATS.values() if name.endswith(row.suffixes)), None)


def format_of(path: PathLike) -> ImageFormat | None:
    """The format of ``path``: a folder's is the row that reads folders, a file's the row of its suffix, else of its
    content (a path that does not exist: the row that sniffs); ``None`` for a file of no format of the table."""
    p = Path(path).expanduser()
    if p.is_dir():
        return next(row for row in FORMATS.values() if row.folders)
    if (kind := suffix_kind(p)) is not None:
        return FORMATS[kind]
    sniffers = [row for row in FORMATS.values() if row.sniff is not None]
    if not p.exists():
        return sniffers[0]
    return next((row for row in sniffers if row.sniff(p)), None)


def reader_kind(path: PathLike, check_exists: bool = True) -> str:
    """Return ``"nifti"``, ``"dicom"``, ``"pil"`` or ``"numpy"`` for ``path`` (a file or a DICOM series folder).

    Raises:
        DataError: the path does not exist (when ``check_exists``) or its format is not supported.
    """
    p = Path(path).expanduser()
    if check_exists and not p.exists():
        raise DataError(
            f"Image file '{p}' not found. Check the path in the datalist (relative paths are resolved against the "
            "datalist's folder or the base_dir you pass)."
        )
    row = format_of(p)
    if row is None:
        raise DataError(
            f"Image file '{p}' has an unsupported format. Supported: {SUPPORTED}. Convert it, e.g. "
            f"`SimpleITK.WriteImage(SimpleITK.ReadImage(path), 'image.nii.gz')`."
        )
    return row.kind


def reader_for(path: PathLike, **kwargs: Any) -> ImageReader:
    """A new MONAI :class:`~monai.data.ImageReader` suited to ``path``; ``kwargs`` go to its constructor."""
    return FORMATS[reader_kind(path)].reader(**kwargs)


def is_image_file(path: PathLike) -> bool:
    """Whether the file ``path`` has a format the loaders read: by its suffix, or, without a known one, by its
    content (DICOM: PACS exports name files ``IM0001`` or by their UID)."""
    path = Path(path)
    return suffix_kind(path) is not None or any(row.sniff(path) for row in FORMATS.values() if row.sniff is not None)


def is_image_folder(path: Path) -> bool:
    """Whether the folder ``path`` is one image: it holds files of a format that reads folders (a DICOM series)."""
    kinds = {row.kind for row in FORMATS.values() if row.folders}
    return any(
        f.is_file() and not f.name.startswith(".") and (row := format_of(f)) is not None and row.kind in kinds
        for f in path.iterdir()
    )
