"""Image loading built on MONAI readers, and the inputs of an inference run.

* :class:`LoadMedicalImage` / :class:`LoadMedicalImaged` wrap :class:`monai.transforms.LoadImage` and pick the
  reader from the path by the table of formats (:mod:`medkd.data.formats`): NIfTI, DICOM files and series folders
  (:class:`~medkd.data.dicom.DicomReader`), PNG/JPEG/BMP and ``.npy``/``.npz``.
* :func:`find_images` lists the images of a folder that the loaders read (inference's ``--input_dir``);
  :func:`inference_items` makes the cases of an inference run.
* Every failure is raised as :class:`DataError`, whose message names the file, the problem and the fix.
* Datalists are read by :mod:`medkd.data.datalists` (:func:`load_datalist`, which the bundles call from here).
"""

from __future__ import annotations

import glob
import logging
import os
import warnings
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.image_reader import ImageReader
from monai.transforms import LoadImage, MapTransform, Transform
from monai.utils import MetaKeys, ensure_tuple

from medkd.data.cases import case_name, channel_suffixes, distinct_names, group_cases
from medkd.data.datalists import load_datalist
from medkd.data.formats import FORMATS, SUPPORTED, is_image_file, is_image_folder, reader_kind
from medkd.errors import DataError

__all__ = [
    "DataError",
    "LoadMedicalImage",
    "LoadMedicalImaged",
    "DropUnitAxesd",
    "drop_unit_axes",
    "find_images",
    "image_loader",
    "inference_items",
    "unit_axes",
]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

ORIENTATION_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # MONAI's default, given to silence its notice
PIL_SUFFIXES = FORMATS["pil"].suffixes  # medkd.prepare.classification reads it here (to import from formats, issue 28)


# ------------------------------------------------------------------------------------------ inputs of inference


def _is_image(path: Path) -> bool:
    """A file of a format the loaders read, or a folder that is one image (a DICOM series)."""
    return is_image_folder(path) if path.is_dir() else is_image_file(path)


def _contents(folder: Path) -> str:
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    if not entries:
        return "it is empty"
    files = sum(p.is_file() for p in entries)
    shown = [p.name + ("/" if p.is_dir() else "") for p in entries[:5]]
    more = ", ..." if len(entries) > 5 else ""
    return f"it holds {files} file(s) and {len(entries) - files} folder(s): {', '.join(shown)}{more}"


def find_images(input_dir: PathLike, pattern: str | None = None) -> list[str]:
    """The images in ``input_dir``, sorted: by default every entry the loaders read (NIfTI ``.nii``/``.nii.gz``,
    DICOM files, with or without extension, and sub-folders holding a DICOM series, PNG/JPEG/BMP, NumPy), other
    files (``README.txt``, ``.mha``, hidden files) being left out; with ``pattern`` (a glob such as ``"*.nii.gz"``
    or ``"*/"``), the entries matching it.

    A folder of DICOM slices is one image only when it is a sub-folder of ``input_dir``; the files directly in
    ``input_dir`` are each an image.

    Raises:
        DataError: the folder does not exist, is a file, or holds no image (the message says what it holds).
    """
    folder = Path(input_dir).expanduser()
    if not folder.exists():
        raise DataError(
            f"Input folder '{folder}' does not exist. Pass --input_dir the folder that holds the images to process."
        )
    if not folder.is_dir():
        raise DataError(
            f"Input folder '{folder}' is a file, not a folder. Pass its folder as --input_dir (with --input_pattern "
            f"'{folder.name}' to process only this file)."
        )
    if pattern:
        found = sorted(str(Path(p)) for p in glob.glob(os.path.join(str(folder), pattern)))
        wanted, fix = (
            f"matching input_pattern '{pattern}'",
            "Fix --input_pattern, or leave it out to take every image of a supported format",
        )
    else:
        found = [str(p) for p in sorted(folder.iterdir()) if not p.name.startswith(".") and _is_image(p)]
        wanted, fix = (
            f"in a supported format ({SUPPORTED})",
            "Point --input_dir at the folder holding the images, or convert them to a supported format",
        )
    if not found:
        raise DataError(f"Input folder '{folder}' holds no image {wanted}: {_contents(folder)}. {fix}.")
    return found


def inference_items(
    input_dir: PathLike | None,
    pattern: str | None,
    datalist: PathLike,
    key: str = "test",
    base_dir: PathLike | None = None,
    spatial_dims: int | None = None,
    name_apart: bool = True,
) -> list[dict]:
    """The inputs of an inference run as ``[{"image": path or paths, "case": name}, ...]``: the images of
    ``input_dir`` (:func:`find_images`), or without one, the images of the datalist's ``key`` list. Where that list's
    cases are several files, one per channel, the files of ``input_dir`` are grouped into cases named the same way
    (:func:`~medkd.data.cases.group_cases`). For 3D networks (``spatial_dims`` 3), an ``input_dir`` that holds only
    single-frame DICOM files is one series. ``case`` is the path the output is named after
    (:func:`~medkd.data.cases.case_name`); with ``name_apart``, cases whose outputs would share a name are renamed
    (:func:`~medkd.data.cases.distinct_names`; not for outputs of one file per run, such as a classifier's CSV).

    Raises:
        DataError: files of ``input_dir`` that form no case, or a list whose cases name their files in different ways.
    """
    if not input_dir:
        images = [item["image"] for item in load_datalist(datalist, key=key, base_dir=base_dir)]
        suffixes = channel_suffixes([{"image": image} for image in images])
        return _distinct_cases([{"image": image, "case": case_name(image, suffixes)} for image in images], name_apart)
    files = find_images(input_dir, pattern)
    if spatial_dims == 3 and _one_series(files):
        logger.info("the %d DICOM slices of %s are read as one series", len(files), input_dir)
        files = [str(Path(input_dir).expanduser())]
    try:
        entries = load_datalist(datalist, key=key, base_dir=base_dir)
    except DataError:  # no datalist beside the checkpoints: the folder's files are the cases
        entries = []
    listed = [e for e in entries if len(ensure_tuple(e["image"])) > 1]
    if not listed:  # cases of one file: named after it, without nnU-Net's channel suffix where the list's files have it
        suffixes = channel_suffixes(entries)
        return _distinct_cases([{"image": f, "case": case_name(f, suffixes)} for f in files], name_apart)
    suffixes = channel_suffixes(listed)
    example = ", ".join(str(f) for f in ensure_tuple(listed[0]["image"]))
    if suffixes is None:
        raise DataError(
            f"The cases of '{datalist}' ['{key}'] are several files each (e.g. {example}), named in different ways, so "
            f"the files of '{input_dir}' cannot be grouped into cases. List the new cases in a datalist instead "
            "(--datalists \"{'test': '/data/new.json'}\", as the training list lists its cases)."
        )
    cases, rest = group_cases(files, suffixes)
    if rest:
        shown = ", ".join(Path(f).name for f in rest[:5]) + (f" and {len(rest) - 5} more" if len(rest) > 5 else "")
        raise DataError(
            f"Input folder '{input_dir}': the networks take {len(suffixes)} files per case, named like the cases of "
            f"'{datalist}' (<case>{'/<case>'.join(suffixes)}, e.g. {example}); {shown} form no case. Add the missing "
            "files, or pick the cases' files with --input_pattern."
        )
    return _distinct_cases([{"image": case, "case": case_name(case)} for case in cases], name_apart)


def _distinct_cases(items: list[dict], enabled: bool = True) -> list[dict]:
    """``items`` with the cases whose outputs would have one name renamed (:func:`~medkd.data.cases.distinct_names`),
    each rename logged; as they are unless ``enabled``."""
    if not enabled:
        return items
    names = distinct_names([item["case"] for item in items])
    for item, name in zip(items, names, strict=True):
        if name != item["case"]:
            logger.warning("%s: its output is named after %s, as another input has its name", item["image"], name)
            item["case"] = name
    return items


def _one_series(files: Sequence[str]) -> bool:
    """Whether ``files`` are several DICOM files of one frame each (the slices of a series, not volumes)."""
    import pydicom

    if len(files) < 2 or not all(Path(f).is_file() and reader_kind(f) == "dicom" for f in files):
        return False
    try:
        header = pydicom.dcmread(files[0], stop_before_pixels=True, force=True)
    except Exception:  # noqa: BLE001 - unreadable: each file is then skipped with its own reason
        return False
    return int(header.get("NumberOfFrames", 1) or 1) == 1


# ----------------------------------------------------------------------------------------------- image loading


def _new_load_image(**kwargs: Any) -> LoadImage:
    """``LoadImage`` instantiates every MONAI reader, including the GPU DICOM codec reader that logs and warns
    on machines without nvImageCodec; keep that notice out of the output."""
    log = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
            return LoadImage(**kwargs)
    finally:
        log.setLevel(level)


class LoadMedicalImage(Transform):
    """:class:`monai.transforms.LoadImage` that picks the reader from the path and raises :class:`DataError`.

    Args:
        image_only: return only the :class:`~monai.data.MetaTensor` (its ``.meta`` holds affine, spacing, filename);
            otherwise return ``(image, meta)`` like ``LoadImage``.
        ensure_channel_first: add/move the channel dimension first (``EnsureChannelFirst``).
        dtype: output dtype (``None`` keeps the stored one).
        reader_kwargs: constructor arguments per reader kind, e.g. ``{"dicom": {"affine_lps_to_ras": False}}``.
    """

    def __init__(
        self,
        image_only: bool = True,
        ensure_channel_first: bool = False,
        dtype: Any = np.float32,
        reader_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self.loader = _new_load_image(image_only=image_only, ensure_channel_first=ensure_channel_first, dtype=dtype)
        self.reader_kwargs = {k: dict(v) for k, v in (reader_kwargs or {}).items()}
        self._readers: dict[str, ImageReader] = {}

    def __call__(self, filename: PathLike | Sequence[PathLike]):
        names = ensure_tuple(filename)
        if not names:
            raise DataError("Empty image path in the datalist entry. Give each entry an image path.")
        kinds = set()
        for name in names:
            kinds.add(reader_kind(name))
            if Path(name).is_file() and os.path.getsize(name) == 0:
                raise DataError(f"Image file '{name}' is empty (0 bytes); the copy or export failed. Re-export it.")
        if len(kinds) > 1:
            raise DataError(f"Images {names} are listed as one multi-channel input but have different formats.")
        kind = kinds.pop()
        if kind not in self._readers:
            self._readers[kind] = FORMATS[kind].reader(**self.reader_kwargs.get(kind, {}))
        shown = names[0] if len(names) == 1 else list(names)
        try:
            return self.loader(filename, reader=self._readers[kind])
        except DataError:
            raise
        except Exception as e:
            raise DataError(
                f"Image file '{shown}' cannot be read as {kind.upper()}: {type(e).__name__}: {e}. The file is "
                "probably corrupt or truncated; re-export it or remove it from the datalist."
            ) from e


class LoadMedicalImaged(MapTransform):
    """Dictionary version of :class:`LoadMedicalImage` (a drop-in for :class:`monai.transforms.LoadImaged`).

    With ``image_only=False`` the metadata is also stored under ``"{key}_{meta_key_postfix}"``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        image_only: bool = True,
        ensure_channel_first: bool = False,
        dtype: Any = np.float32,
        reader_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
        meta_key_postfix: str = "meta_dict",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_only = image_only
        self.meta_key_postfix = meta_key_postfix
        self.loader = LoadMedicalImage(image_only, ensure_channel_first, dtype, reader_kwargs)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if self.image_only:
                d[key] = self.loader(d[key])
            else:
                d[key], d[f"{key}_{self.meta_key_postfix}"] = self.loader(d[key])
        return d


def unit_axes(image: Any, count: int) -> bool:
    """Whether the last ``count`` axes of ``image`` have size 1."""
    return all(int(n) == 1 for n in image.shape[image.ndim - count :])


def drop_unit_axes(image: Any, spatial_dims: int) -> Any:
    """A channel-first ``image`` with more spatial axes than ``spatial_dims`` whose extra trailing axes have size 1
    (a 2D slice stored in NIfTI as ``(H, W, 1)``), without those axes, as a 2D file would load; any other image as it
    is. Its affine is kept (a 2D file's is 4x4 too).

    Shapes: ``(C, H, W, 1)`` -> ``(C, H, W)`` for ``spatial_dims`` 2."""
    extra = image.ndim - 1 - int(spatial_dims)
    if extra <= 0 or not unit_axes(image, extra):
        return image
    out = image[(..., *([0] * extra))]
    if isinstance(out, MetaTensor):
        out.meta[MetaKeys.SPATIAL_SHAPE] = np.asarray(out.shape[1:])
        out.spatial_ndim = int(spatial_dims)
    return out


class DropUnitAxesd(MapTransform):
    """Dictionary version of :func:`drop_unit_axes`; place it right after the loader."""

    def __init__(self, keys: KeysCollection, spatial_dims: int, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spatial_dims = int(spatial_dims)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = drop_unit_axes(d[key], self.spatial_dims)
        return d


def image_loader(keys: KeysCollection, ensure_channel_first: bool = True, **kwargs: Any) -> LoadMedicalImaged:
    """Recommended loader for bundles: ``LoadMedicalImaged(keys, ensure_channel_first=True, **kwargs)``.

    In a bundle config: ``"$medkd.data.loading.image_loader(['image', 'label'])"``.
    """
    return LoadMedicalImaged(keys, ensure_channel_first=ensure_channel_first, **kwargs)
