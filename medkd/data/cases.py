"""Cases of several image files, one per channel (``case_0000.nii.gz``, ``case_0001.nii.gz``; ``case_t1.nii.gz``, ...).

A datalist lists such a case as a list of files (``{"image": ["a_0000.nii.gz", "a_0001.nii.gz"], ...}``). A folder of
new images does not: :func:`channel_suffixes` reads how a datalist's cases name their files, :func:`group_cases`
groups a folder's files into cases named the same way, and :func:`case_name` names a case after what its files share
(``a``), which inference names its output after (:class:`NameAfterCase`); :class:`OneLabelMapd` lets MONAI write
the segmentation of such a case.
"""

from __future__ import annotations

import os
import re
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import ImageMetaKey, MetaKeys, ensure_tuple

__all__ = ["NameAfterCase", "OneLabelMapd", "case_name", "channel_suffixes", "group_cases", "distinct_names"]

SEPARATORS = "_-."
NNUNET_CHANNEL = re.compile(r"_0000(\.[A-Za-z]+)+$")  # the channel suffix of an nnU-Net case of one file


def _stem(files: Sequence[str]) -> str:
    """What the paths of ``files`` share up to their last separator (``_``, ``-``, ``.`` or a folder) before they
    differ; ``""`` when they share no file name part."""
    shared = os.path.commonprefix([str(f) for f in files])
    cut = max(shared.rfind(c) for c in (*SEPARATORS, "/", os.sep))
    return shared[: cut + 1] if cut >= 0 else ""


def case_name(files: str | Sequence[str], suffixes: Sequence[str] | None = None) -> str:
    """The path a case of ``files`` is named by: the one file, without its channel suffix where ``suffixes`` (of
    :func:`channel_suffixes`) has one (``a_0000.nii.gz``: ``a.nii.gz``, as nnU-Net names a case of one channel); else
    what their names share before their channel parts, in the first file's folder with its extension
    (``.../a_0000.nii.gz`` and ``.../a_0001.nii.gz``: ``.../a.nii.gz``); the folder, for files of one folder whose
    names share nothing (``a/t1.nii.gz``, ``a/t2.nii.gz``: ``a.nii.gz``); else the first file (``t1/a.nii.gz``,
    ``t2/a.nii.gz``)."""
    files = [str(f) for f in ensure_tuple(files)]
    first, names = files[0], [os.path.basename(str(f)) for f in files]
    extension = ".nii.gz" if first.lower().endswith(".nii.gz") else os.path.splitext(first)[1]
    stem = _stem(names).rstrip(SEPARATORS)
    if (
        len(files) == 1
        and suffixes
        and len(suffixes) == 1
        and names[0].endswith(suffixes[0])
        and names[0] != suffixes[0]
    ):
        return first[: len(first) - len(suffixes[0])] + extension
    if len(set(names)) == 1:
        return first
    if stem:
        return os.path.join(os.path.dirname(first), stem + extension)
    if len({os.path.dirname(f) for f in files}) == 1 and os.path.dirname(first):
        return os.path.dirname(first) + extension
    return first


def channel_suffixes(entries: Sequence[Mapping[str, Any]], image_key: str = "image") -> tuple[str, ...] | None:
    """How the cases of ``entries`` (datalist entries) name their channels' files: what follows the part their paths
    share (``("_0000.nii.gz", "_0001.nii.gz")``), the same for every case; for cases of one file, nnU-Net's channel
    suffix where every file has it (``("_0000.nii.gz",)``); ``None`` when the cases are other single files, or name
    their files in different ways."""
    found = set()
    singles = [str(ensure_tuple(e[image_key])[0]) for e in entries if len(ensure_tuple(e[image_key])) == 1]
    if entries and len(singles) == len(entries):
        matches = [NNUNET_CHANNEL.search(os.path.basename(f)) for f in singles]
        endings = {m.group(0) for m in matches if m}
        return (endings.pop(),) if all(matches) and len(endings) == 1 else None
    for entry in entries:
        files = [str(f) for f in ensure_tuple(entry[image_key])]
        if len(files) < 2 or len(set(files)) < len(files):
            return None
        shared = len(_stem(files).rstrip(SEPARATORS))
        found.add(tuple(f[shared:] for f in files))
    return found.pop() if len(found) == 1 else None


def group_cases(files: Sequence[str], suffixes: Sequence[str]) -> tuple[list[list[str]], list[str]]:
    """The cases among ``files``: each file ending in the first suffix, with the files that end in the other suffixes
    in its place (``a_0000.nii.gz`` with ``a_0001.nii.gz``), in the order of ``files``; and the files of no case."""
    present = set(files)
    cases = []
    for f in files:
        if f.endswith(suffixes[0]) and len(f) > len(suffixes[0]):
            case = [f[: len(f) - len(suffixes[0])] + s for s in suffixes]
            if all(c in present for c in case):
                cases.append(case)
    used = {f for case in cases for f in case}
    return cases, [f for f in files if f not in used]


def _split_name(path: str) -> tuple[str, str]:
    """A path's folder, file name without extension and extension, as MONAI's ``SaveImage`` names its output after
    it (``create_file_basename``: one extension, two for ``.gz``)."""
    folder, name = os.path.split(path)
    stem, ext = os.path.splitext(name)
    if ext == ".gz":
        stem, first = os.path.splitext(stem)
        ext = first + ext
    return os.path.join(folder, stem), ext


def distinct_names(cases: Sequence[str]) -> list[str]:
    """``cases`` (the paths outputs are named after, :func:`case_name`) renamed where two would give outputs of one
    name, which would overwrite each other (``scan.nii`` and ``scan.nii.gz``, a series folder ``case1`` beside
    ``case1.nii.gz``, ``a/scan.png`` and ``b/scan.png`` written to one folder): each of them takes its extension
    into its name (``scan_nii.nii``, ``scan_nii_gz.nii.gz``), then its folder's name, then its position, until the
    names differ. The others are kept."""
    names = list(cases)
    for attempt in ("extension", "folder", "position"):
        stems = [os.path.basename(_split_name(c)[0]) for c in names]
        clashing = [i for i, stem in enumerate(stems) if stems.count(stem) > 1]
        if not clashing:
            break
        for n, i in enumerate(clashing):
            base, ext = _split_name(names[i])
            folder, stem = os.path.split(base)
            if attempt == "extension":
                stem += ext.replace(".", "_")
            elif attempt == "folder":
                stem = f"{os.path.basename(os.path.dirname(cases[i])) or 'root'}_{stem}"
            else:
                stem += f"_{n + 1}"
            names[i] = os.path.join(folder, stem + ext)
    return names


class NameAfterCase(MapTransform):
    """Name each loaded image of ``keys`` after its case: its metadata's ``filename_or_obj`` (which MONAI's
    ``SaveImage`` names the output after, the first file's for several files) becomes the item's ``case_key`` entry
    (:func:`case_name`). Items without one are left as they are."""

    def __init__(self, keys: KeysCollection, case_key: str = "case", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.case_key = case_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if self.case_key in d and hasattr(d[key], "meta"):
                d[key].meta[ImageMetaKey.FILENAME_OR_OBJ] = str(d[self.case_key])
        return d


class OneLabelMapd(MapTransform):
    """Mark each output of ``keys`` (a segmentation, one channel) as an image without channel dimension in its source
    (metadata ``original_channel_dim`` ``"no_channel"``), as the output of a single-file case is. The output of a case
    of several files inherits ``0`` (the files stacked), with which MONAI 1.6's ``SaveImage`` fails on a 2D output
    ("cannot find a suitable writer", from ``SpatialResample``)."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if hasattr(d[key], "meta"):
                d[key].meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = "no_channel"
        return d
