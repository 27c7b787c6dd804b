"""Exact and near-duplicate images, within a list and across the lists of a datalist (leakage).

Each image gets two fingerprints, computed with numpy alone:

* an **exact hash**: SHA-1 of the pixel array (shape, dtype and values), so two files that decode to the same
  pixels match whatever their format or metadata (a PNG and the NIfTI file holding its pixels);
* a **perceptual hash** of 256 bits: the image in greyscale, shrunk to 64x64 (box filter), its 2D DCT-II, and one
  bit per coefficient of the 16x16 lowest frequencies, set when the coefficient is above their median (the DC term
  is left out). It does not change with the size of the image or a linear change of brightness or contrast, and
  changes by a few bits with noise, JPEG recompression or mild filtering.

Two images are near-duplicates when the Hamming distance of their perceptual hashes is at most ``max_distance``
(:data:`DEFAULT_MAX_DISTANCE` of 256 bits). Pairs are linked into groups (connected components).
:func:`find_duplicates` hashes the entries of every list; :class:`DuplicateReport` says which groups stay inside one
list (warnings) and which pairs cross lists (leakage, problems).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from medkd.data.formats import suffix_kind
from medkd.data.loading import LoadMedicalImage
from medkd.errors import DataError

__all__ = [
    "DEFAULT_MAX_DISTANCE",
    "Duplicate",
    "DuplicateReport",
    "ImageHashes",
    "duplicate_groups",
    "find_duplicates",
    "hamming_distances",
    "hash_images",
    "near_duplicate_pairs",
    "perceptual_hash",
]

THUMBNAIL = 64  # images are shrunk to THUMBNAIL x THUMBNAIL before the DCT
HASH_SIDE = 16  # HASH_SIDE x HASH_SIDE low-frequency coefficients -> 256 bits
HASH_WORDS = HASH_SIDE * HASH_SIDE // 64
DEFAULT_MAX_DISTANCE = 12  # of 256 bits; brain_tumor_mri: re-contrasted copies at 2-16, other slices mostly > 20


# ------------------------------------------------------------------------------------------------------- hashing


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)
    matrix = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n))
    matrix[0] /= np.sqrt(2.0)
    return matrix


_DCT = _dct_matrix(THUMBNAIL)[:HASH_SIDE]


def perceptual_hash(thumbnails: np.ndarray) -> np.ndarray:
    """Perceptual hashes of ``(n, 64, 64)`` greyscale thumbnails, as ``(n, 4)`` ``uint64`` words (256 bits each)."""
    thumbs = np.asarray(thumbnails, dtype=np.float64).reshape(-1, THUMBNAIL, THUMBNAIL)
    low = (_DCT @ thumbs @ _DCT.T).reshape(len(thumbs), HASH_SIDE * HASH_SIDE)
    ac = low[:, 1:]
    bits = np.zeros(low.shape, dtype=bool)
    bits[:, 1:] = ac > np.median(ac, axis=1, keepdims=True)
    return np.packbits(bits, axis=1).view(">u8").astype(np.uint64)


def _grey_thumbnail(grey: Image.Image) -> np.ndarray:
    """64x64 float32 thumbnail of a one-channel PIL image (rows first, like Pillow)."""
    small = grey.convert("F").resize((THUMBNAIL, THUMBNAIL), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32)


def _exact_hash(array: np.ndarray) -> str:
    digest = hashlib.sha1(f"{array.shape}{array.dtype.str}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _pil_hashes(path: str) -> tuple[str, np.ndarray]:
    with Image.open(path) as image:
        if image.mode == "P":
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        image.load()
        pixels = np.asarray(image)
        exact = _exact_hash(pixels)
        bands = image.getbands()
        if len(bands) > 1:  # drop alpha, average the colour channels
            colour = [b for b in bands if b != "A"] or [bands[0]]
            image = Image.fromarray(np.mean([np.asarray(image.getchannel(b), np.float32) for b in colour], axis=0))
        return exact, _grey_thumbnail(image)


def _array_thumbnail(array: np.ndarray) -> np.ndarray:
    """Thumbnail of an array in Pillow's axis order (rows first): the central slice along trailing axes until 2D
    (3D volumes: the middle slice)."""
    array = np.asarray(array, dtype=np.float32)
    while array.ndim > 2:
        array = array[..., array.shape[-1] // 2]
    if array.ndim < 2:
        array = array.reshape(1, -1)
    array = np.nan_to_num(array)
    return _grey_thumbnail(Image.fromarray(np.ascontiguousarray(array)))


@dataclass
class ImageHashes:
    """Exact and perceptual hashes of a list of images; ``errors`` maps the index of an unreadable image to why."""

    paths: list[str]
    exact: list[str]
    perceptual: np.ndarray
    errors: dict[int, str] = field(default_factory=dict)


def hash_images(paths: Sequence[Any], progress: bool = True) -> ImageHashes:
    """Hash every image of ``paths`` (files the medkd loaders read; PNG/JPEG/BMP are read with Pillow directly).

    An image that cannot be read gets an empty exact hash and is listed in ``errors`` (it matches nothing).
    """
    loader: LoadMedicalImage | None = None
    names = [str(p[0]) if isinstance(p, list | tuple) and len(p) == 1 else str(p) for p in paths]
    exact: list[str] = []
    codes = np.zeros((len(names), HASH_WORDS), np.uint64)
    block = 256
    thumbs = np.zeros((block, THUMBNAIL, THUMBNAIL), np.float32)
    errors: dict[int, str] = {}
    for i, path in enumerate(tqdm(paths, desc="hashing images", disable=not progress)):
        slot = i % block
        try:
            if isinstance(path, str | os.PathLike) and suffix_kind(path) == "pil":
                digest, thumbs[slot] = _pil_hashes(str(path))
            else:
                loader = loader or LoadMedicalImage(image_only=True, dtype=None)
                array = np.asarray(loader(path))
                if array.ndim >= 2:  # MONAI puts columns first; compare in Pillow's order (rows first)
                    array = np.swapaxes(array, 0, 1)
                digest, thumbs[slot] = _exact_hash(array), _array_thumbnail(array)
        except (OSError, ValueError, DataError) as e:
            digest, errors[i], thumbs[slot] = "", f"{type(e).__name__}: {e}", 0
        exact.append(digest)
        if slot == block - 1 or i == len(names) - 1:
            codes[i - slot : i + 1] = perceptual_hash(thumbs[: slot + 1])
    return ImageHashes(names, exact, codes, errors)


# ----------------------------------------------------------------------------------------------- finding pairs


def _popcount(words: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(words)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
    return table[words.view(np.uint8).reshape(*words.shape, 8)].sum(-1, dtype=np.uint8)


def hamming_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(len(a), len(b))`` Hamming distances between two arrays of hashes (rows of ``uint64`` words)."""
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    out = np.zeros((len(a), len(b)), dtype=np.uint16)
    for w in range(a.shape[1]):
        out += _popcount(a[:, None, w] ^ b[None, :, w])
    return out


@dataclass(frozen=True)
class Duplicate:
    """Images ``a`` < ``b`` (indices) are duplicates: identical pixels (``exact``) or hashes ``distance`` apart."""

    a: int
    b: int
    distance: int
    exact: bool

    def describe(self) -> str:
        return "exact duplicate" if self.exact else f"near-duplicate, distance {self.distance}"


def near_duplicate_pairs(hashes: ImageHashes, max_distance: int = DEFAULT_MAX_DISTANCE) -> list[Duplicate]:
    """Every pair of images with identical pixels or, when ``max_distance >= 0``, perceptual hashes at most
    ``max_distance`` bits apart; compared in blocks, so thousands of images take about a second."""
    valid = np.array([i not in hashes.errors for i in range(len(hashes.paths))], dtype=bool)
    pairs: dict[tuple[int, int], Duplicate] = {}
    by_exact: dict[str, list[int]] = defaultdict(list)
    for i, digest in enumerate(hashes.exact):
        if digest:
            by_exact[digest].append(i)
    for members in by_exact.values():
        for k, a in enumerate(members):
            for b in members[k + 1 :]:
                pairs[(a, b)] = Duplicate(a, b, 0, True)
    if max_distance >= 0:
        index = np.flatnonzero(valid)
        codes = hashes.perceptual[index]
        block = 512
        for start in range(0, len(index), block):
            dist = hamming_distances(codes[start : start + block], codes[start:])
            rows, cols = np.nonzero(dist <= max_distance)
            for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
                if c > r:
                    key = (int(index[start + r]), int(index[start + c]))
                    pairs.setdefault(key, Duplicate(*key, int(dist[r, c]), False))
    return sorted(pairs.values(), key=lambda d: (d.a, d.b))


def duplicate_groups(count: int, pairs: Sequence[Duplicate]) -> list[list[int]]:
    """Connected components (of two or more images) of the duplicate pairs among ``count`` images, sorted."""
    parent = list(range(count))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for pair in pairs:
        ra, rb = root(pair.a), root(pair.b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    members: dict[int, list[int]] = defaultdict(list)
    for i in range(count):
        members[root(i)].append(i)
    return sorted((m for m in members.values() if len(m) > 1), key=lambda m: m[0])


# --------------------------------------------------------------------------------------------- datalist report


@dataclass
class DuplicateReport:
    """Duplicates among the entries of one or more lists: ``splits[i]`` is the list of image ``i``."""

    hashes: ImageHashes
    splits: list[str]
    labels: list[Any]
    pairs: list[Duplicate]
    groups: list[list[int]]
    max_distance: int
    seconds: float
    class_names: Sequence[str] | None = None

    def _pairs_by_group(self) -> list[list[Duplicate]]:
        group_of = {i: g for g, members in enumerate(self.groups) for i in members}
        by_group: list[list[Duplicate]] = [[] for _ in self.groups]
        for pair in self.pairs:
            by_group[group_of[pair.a]].append(pair)
        return by_group

    @property
    def leakage(self) -> list[Duplicate]:
        """Pairs whose images are in different lists."""
        return [p for p in self.pairs if self.splits[p.a] != self.splits[p.b]]

    def _name(self, i: int, root: str) -> str:
        path = self.hashes.paths[i]
        inside = root and os.path.abspath(path).startswith(os.path.join(os.path.abspath(root), ""))
        return os.path.relpath(path, root) if inside else path

    def _label(self, i: int) -> str:
        label = self.labels[i]
        if isinstance(label, int | np.integer) and self.class_names and 0 <= label < len(self.class_names):
            return self.class_names[label]
        return str(label)

    def _label_note(self, members: Sequence[int]) -> str:
        labels = [self.labels[i] for i in members]
        if any(isinstance(x, str | os.PathLike) for x in labels) or len({str(x) for x in labels}) < 2:
            return ""
        return "; labels differ: " + " != ".join(dict.fromkeys(self._label(i) for i in members))

    def root(self) -> str:
        """Common folder of the images, to shorten the paths in the report ("" when that is the file system's root:
        paths stay absolute)."""
        folders = {os.path.dirname(os.path.abspath(p)) for p in self.hashes.paths}
        try:
            common = os.path.commonpath(sorted(folders)) if folders else ""
        except ValueError:  # different drives
            return ""
        return "" if os.path.dirname(common) == common else common

    def warnings(self, root: str | None = None) -> list[str]:
        """One line per group of duplicates inside one list."""
        root = self.root() if root is None else root
        lines = []
        for group, group_pairs in zip(self.groups, self._pairs_by_group(), strict=True):
            by_split: dict[str, list[int]] = defaultdict(list)
            for i in group:
                by_split[self.splits[i]].append(i)
            for split, members in by_split.items():
                if len(members) < 2:
                    continue
                inside = [p for p in group_pairs if self.splits[p.a] == self.splits[p.b] == split]
                if not inside:
                    kind = "near-duplicates through images of another list"
                elif all(p.exact for p in inside):
                    kind = "exact duplicates"
                else:
                    kind = f"near-duplicates, distance <= {max(p.distance for p in inside)}"
                names = ", ".join(self._name(i, root) for i in members)
                lines.append(f"[duplicate] {split}: {len(members)} images ({kind}): {names}{self._label_note(members)}")
        return lines

    def leakage_lines(self, root: str | None = None) -> list[str]:
        """One line per pair of duplicates in different lists."""
        root = self.root() if root is None else root
        return [
            f"[leakage] {self.splits[p.a]}:{self._name(p.a, root)} ~ {self.splits[p.b]}:{self._name(p.b, root)} "
            f"({p.describe()}{self._label_note([p.a, p.b])})"
            for p in self.leakage
        ]

    def summary(self) -> str:
        """One line: images hashed, groups found, how many cross lists, time taken."""
        exact = sum(all(p.exact for p in pairs) for pairs in self._pairs_by_group())
        crossing = sum(len({self.splits[i] for i in g}) > 1 for g in self.groups)
        in_groups = sum(len(g) for g in self.groups)
        return (
            f"Duplicates: {len(self.hashes.paths)} images hashed in {self.seconds:.1f} s; {len(self.groups)} group(s) "
            f"of duplicates ({exact} exact, {len(self.groups) - exact} with near-duplicates; {in_groups} images), "
            f"{crossing} group(s) across lists with {len(self.leakage)} cross-list pair(s) "
            + (
                f"(near-duplicate: perceptual-hash distance <= {self.max_distance} of {HASH_SIDE * HASH_SIDE} bits)"
                if self.max_distance >= 0
                else "(exact duplicates only)"
            )
        )

    def write_tsv(self, path: str | os.PathLike) -> None:
        """Every pair, tab-separated: group, kind, distance, and list, label and path of both images."""
        group_of = {i: g for g, members in enumerate(self.groups) for i in members}
        lines = ["group\tkind\tdistance\tlist_a\tlabel_a\tpath_a\tlist_b\tlabel_b\tpath_b"]
        for p in self.pairs:
            kind = "exact" if p.exact else "near"
            a = f"{self.splits[p.a]}\t{self._label(p.a)}\t{self.hashes.paths[p.a]}"
            b = f"{self.splits[p.b]}\t{self._label(p.b)}\t{self.hashes.paths[p.b]}"
            lines.append(f"{group_of[p.a]}\t{kind}\t{p.distance}\t{a}\t{b}")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text("\n".join(lines) + "\n")


def find_duplicates(
    lists: Mapping[str, Sequence[Mapping[str, Any]]],
    max_distance: int = DEFAULT_MAX_DISTANCE,
    image_key: str = "image",
    label_key: str = "label",
    class_names: Sequence[str] | None = None,
    progress: bool = True,
    clock: Callable[[], float] = time.perf_counter,
) -> DuplicateReport:
    """Hash the images of every list (``{"training": entries, "test": entries}``) and find their duplicates.

    Args:
        lists: datalist entries by list name (e.g. from :func:`medkd.data.loading.load_datalist` per key).
        max_distance: largest perceptual-hash distance (of 256 bits) of a near-duplicate; ``-1``: exact only.
        class_names: names of integer labels, for the note on duplicates whose labels differ.
    """
    start = clock()
    paths, splits, labels = [], [], []
    for split, entries in lists.items():
        for entry in entries:
            if isinstance(entry, Mapping) and entry.get(image_key):
                paths.append(entry[image_key])
                splits.append(split)
                labels.append(entry.get(label_key))
    hashes = hash_images(paths, progress=progress)
    pairs = near_duplicate_pairs(hashes, max_distance)
    groups = duplicate_groups(len(paths), pairs)
    return DuplicateReport(hashes, splits, labels, pairs, groups, max_distance, clock() - start, class_names)
