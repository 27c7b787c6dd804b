"""``prepare segmentation``: 2D images plus masks → greyscale NIfTI (or PNG) images and class-index label maps,
resampled to one pixel size and optionally tiled, split by group, with a Decathlon ``dataset.json``."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from medkd.data.loading import DataError
from medkd.data.splits import Unit, group_of, group_regex, random_splits, relative
from medkd.prepare.output import Prepared, output_folder, shown, write_prepared
from medkd.prepare.pairing import Pair, find_sidecar, pair_files, pixel_size_from_sidecar
from medkd.prepare.pixels import central_span, map_mask_values, read_grey, resample, tile_origins, write_image
from medkd.prepare.splits import SPLITS, explicit_splits, parse_split_spec

__all__ = ["prepare_segmentation"]

MAX_IMPLICIT_CLASSES = 32


def _names(pairs: Sequence[Pair]) -> dict[str, str]:
    """Output name of each image: its file stem, or its path with '__' for '/' where stems repeat."""
    stems = {p.image: Path(p.image).name.split(".")[0] for p in pairs}
    repeated = {stem for stem, n in Counter(stems.values()).items() if n > 1}
    return {
        image: (image.rsplit(".", 1)[0].replace("/", "__") if stem in repeated else stem)
        for image, stem in stems.items()
    }


def _source_sizes(
    root: Path, pairs: Sequence[Pair], key: str, given: tuple[float, float] | None, needed: bool
) -> tuple[dict[str, tuple[float, float] | None], dict[str, str], set[str]]:
    """Pixel size of each image (sidecar ``key``, else ``given``), where it came from, and the units found.

    Raises:
        DataError: ``needed`` (resampling asked for) and some image has no pixel size.
    """
    sizes: dict[str, tuple[float, float] | None] = {}
    origin: dict[str, str] = {}
    units: set[str] = set()
    for pair in pairs:
        sidecar = find_sidecar(root / pair.image, root)
        size, unit = pixel_size_from_sidecar(sidecar, key) if sidecar is not None else (None, None)
        if size is not None:
            sizes[pair.image], origin[pair.image] = size, relative(sidecar, root)
            if unit:
                units.add(str(unit))
        else:
            sizes[pair.image], origin[pair.image] = given, "--source-pixel-size" if given else "unknown"
    missing = [image for image, size in sizes.items() if size is None]
    if needed and missing:
        raise DataError(
            f"--pixel-size needs the pixel size of every image, but {shown(missing)} have no JSON sidecar with "
            f"'{key}' (looked for <image stem>.json, then BIDS-inherited sidecars). Add sidecars, name the key with "
            "--pixel-size-key, or give the size of these images with --source-pixel-size."
        )
    return sizes, origin, units


def _mask_classes(root: Path, pairs: Sequence[Pair], progress: bool) -> int:
    """Number of classes when masks hold class indices: the largest value found plus one."""
    largest = 0
    for pair in tqdm(pairs, desc="reading mask values", disable=not progress):
        mask, _ = read_grey(root / pair.mask, "mask")
        found = np.unique(mask)
        if found.size and (found.max() >= MAX_IMPLICIT_CLASSES or np.any(found != np.round(found))):
            raise DataError(
                f"mask '{root / pair.mask}' holds values {found[:10].tolist()}, which are not class indices; give "
                f"the value of each class in order with --mask-values (e.g. --mask-values "
                f"{','.join(str(v) for v in found[:10].tolist())}) and the names with --class-names."
            )
        largest = max(largest, int(found.max()) if found.size else 0)
    return largest + 1


def _assign_splits(
    groups: dict[str, str | None],
    split: Sequence[str] | None,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    by: str,
) -> tuple[dict[str, str], str]:
    """Split of each group (an image without one: group "") and how it was decided."""
    sizes: dict[str, int] = defaultdict(int)
    for group in groups.values():
        sizes[group or ""] += 1
    units = [Unit(g, None, n) for g, n in sorted(sizes.items())]
    spec = parse_split_spec(split) if split else None
    if spec and all(isinstance(v, float) for v in spec.values()):
        val_fraction, test_fraction = float(spec.get("validation", 0.0)), float(spec.get("test", 0.0))
        if "training" in spec and abs(spec["training"] + val_fraction + test_fraction - 1) > 1e-6:
            raise DataError(f"--split fractions {spec} must add up to 1.")
        spec = None
    if spec:
        return explicit_splits(list(sizes), spec, by), "--split " + " ".join(split or [])
    how = f"random by group (seed {seed}): validation {val_fraction:g}, test {test_fraction:g} of the images"
    return random_splits(units, val_fraction, test_fraction, seed), how


@dataclass
class _Job:
    """What every image pair of one ``prepare segmentation`` run is prepared with."""

    root: Path
    out: Path
    values: list[float] | None
    num_classes: int
    snap: bool
    target: tuple[float, float] | None
    sizes: dict[str, tuple[float, float] | None]
    size_origin: dict[str, str]
    unit: str | None
    crop: int | None
    tile: int | None
    tile_overlap: int
    suffix: str
    out_names: dict[str, str]


def _check_options(root: Path, crop: int | None, tile: int | None, tile_overlap: int, file_format: str) -> None:
    if not root.is_dir():
        raise DataError(f"--root '{root}' is not a folder. Pass the folder the --images and --masks patterns start at.")
    if crop is not None and crop < 1:
        raise DataError(f"--crop {crop} must be a positive size in pixels (after resampling).")
    if tile is not None and (tile < 1 or not 0 <= tile_overlap < tile):
        raise DataError(f"--tile {tile} must be a positive size and --tile-overlap {tile_overlap} in 0..{tile - 1}.")
    if file_format not in ("nifti", "png"):
        raise DataError(f"--format {file_format!r} must be nifti or png.")


def _groups(pairs: Sequence[Pair], group_by: str | None) -> dict[str, str | None]:
    """The group of each image (``group_by`` over its path); :class:`DataError` naming the images it misses."""
    regex = group_regex(group_by)
    groups = {p.image: group_of(p.image, regex) for p in pairs}
    unmatched = [image for image, group in groups.items() if group is None]
    if unmatched:
        raise DataError(
            f"--group-by {group_by!r} matches nothing in {shown(unmatched)} (it is searched in the image path "
            f"relative to --root, e.g. '{unmatched[0]}'); fix the expression."
        )
    return groups


def _classes(
    root: Path,
    pairs: Sequence[Pair],
    mask_values: Sequence[float] | None,
    class_names: Sequence[str] | None,
    progress: bool,
) -> tuple[list[float] | None, int, list[str]]:
    """The mask value of each class (if given), the number of classes and their names."""
    values = [float(v) for v in mask_values] if mask_values else None
    if values is not None and len(set(values)) != len(values):
        raise DataError(f"--mask-values {mask_values} lists a value twice; give each class's value once.")
    num_classes = len(values) if values else len(class_names) if class_names else _mask_classes(root, pairs, progress)
    names = list(class_names) if class_names else ["background", *[f"class{i}" for i in range(1, num_classes)]]
    if len(names) != num_classes:
        raise DataError(
            f"--class-names gives {len(names)} names ({','.join(names)}) for {num_classes} classes "
            f"({'--mask-values ' + ','.join(f'{v:g}' for v in values) if values else 'mask values'}); give one name "
            "per class, background first."
        )
    return values, num_classes, names


def prepare_segmentation(
    root: str | Path,
    output: str | Path,
    images: str,
    masks: str,
    mask_values: Sequence[float] | None = None,
    class_names: Sequence[str] | None = None,
    snap: bool = True,
    group_by: str | None = None,
    split: Sequence[str] | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.0,
    seed: int = 0,
    pixel_size: Sequence[float] | None = None,
    pixel_size_key: str = "PixelSize",
    source_pixel_size: Sequence[float] | None = None,
    crop: int | None = None,
    tile: int | None = None,
    tile_overlap: int = 0,
    file_format: str = "nifti",
    overwrite: bool = False,
    progress: bool = True,
) -> Prepared:
    """Prepare an images-plus-masks layout for the segmentation bundles (see ``docs/data.md``).

    Images and masks are paired by their wildcard captures (:func:`medkd.prepare.pairing.pair_files`); images become
    one channel (alpha dropped, colour to luma); mask values become class indices (``mask_values[i]`` → ``i``, other
    values snapped to the nearest listed one unless ``snap`` is false); groups (``group_by`` regex over the image
    path) are split as wholes (``split`` lists or fractions); ``pixel_size`` resamples every image from its sidecar
    (``pixel_size_key``) or ``source_pixel_size``; ``crop`` keeps the central ``crop`` x ``crop`` pixels of each image
    after resampling (a smaller side is kept whole); ``tile`` then cuts square tiles.

    Writes the images, ``dataset.json``, ``prepare.json`` and ``sources.csv`` into ``output`` and returns what was
    decided.

    Raises:
        DataError: naming the option or file and the fix, before anything is written where possible.
    """
    root = Path(root).expanduser().absolute()
    _check_options(root, crop, tile, tile_overlap, file_format)
    pairs, lone_images, lone_masks = pair_files(root, images, masks)
    groups = _groups(pairs, group_by)
    target = _pair(pixel_size, "--pixel-size")
    given = _pair(source_pixel_size, "--source-pixel-size")
    sizes, size_origin, units = _source_sizes(root, pairs, pixel_size_key, given, target is not None)
    values, num_classes, names = _classes(root, pairs, mask_values, class_names, progress)
    split_of_group, how = _assign_splits(groups, split, val_fraction, test_fraction, seed, group_by)
    out = output_folder(output, root, overwrite)
    unit = next(iter(units)) if len(units) == 1 else None
    prepared = Prepared("segmentation", str(root), str(out), names)
    prepared.settings = {
        "images": images,
        "masks": masks,
        "mask_values": values,
        "snap": snap,
        "group_by": group_by,
        "split": how,
        "pixel_size": list(target) if target else None,
        "pixel_size_key": pixel_size_key,
        "source_pixel_size": list(given) if given else None,
        "pixel_size_unit": unit or (sorted(units) if units else None),
        "crop": crop,
        "tile": tile,
        "tile_overlap": tile_overlap,
        "format": file_format,
        "seed": seed,
    }
    _note_inputs(prepared, values, lone_images, lone_masks, images, masks, group_by)
    job = _Job(root, out, values, num_classes, snap, target, sizes, size_origin, unit, crop, tile, tile_overlap,
               ".png" if file_format == "png" else ".nii.gz", _names(pairs))  # fmt: skip
    stats = {s: {"items": 0, "images": 0, "groups": set(), "present": np.zeros(num_classes, int),
                 "pixels": np.zeros(num_classes, np.int64)} for s in SPLITS}  # fmt: skip
    for pair in tqdm(pairs, desc="preparing images", disable=not progress):
        group = groups[pair.image] or ""
        _prepare_pair(job, pair, group, split_of_group[group], prepared, stats)
    _summarise(prepared, stats, names, bool(tile or crop))
    prepared.hints = _hints(out, spacing_hint=list(target) if target else None, png=file_format == "png")
    write_prepared(prepared)
    return prepared


def _note_inputs(
    prepared: Prepared,
    values: list[float] | None,
    lone_images: Sequence[str],
    lone_masks: Sequence[str],
    images: str,
    masks: str,
    group_by: str | None,
) -> None:
    """Record the mask values, the files left without a partner, and a missing ``--group-by``."""
    if values:
        prepared.extra["mask_values"] = {f"{v:g}": i for i, v in enumerate(values)}
    for image in lone_images:
        prepared.drop(image, f"no mask matches it (--masks '{masks}')")
    for mask in lone_masks:
        prepared.drop(mask, f"mask without an image (--images '{images}')")
    if not group_by:
        prepared.notes.append(
            "no --group-by: each image is its own group; if several images come from one subject, pass --group-by "
            "so that a subject is never in two splits"
        )


def _read_pair(job: _Job, pair: Pair, prepared: Prepared) -> tuple[np.ndarray, np.ndarray] | None:
    """The image and its label map (class indices), or ``None`` when the pair is dropped (noted in ``prepared``)."""
    try:
        image, image_note = read_grey(job.root / pair.image, "image")
        mask, mask_note = read_grey(job.root / pair.mask, "mask")
    except DataError as e:
        prepared.drop(pair.image, str(e))
        return None
    for path, note in ((pair.image, image_note), (pair.mask, mask_note)):
        if note:
            prepared.notes.append(f"{path}: {note}")
    if mask_note and mask_note.startswith("colour"):
        prepared.drop(pair.image, f"its mask {pair.mask} is in colour; masks must hold one value per class")
        return None
    if image.shape != mask.shape:
        prepared.drop(pair.image, f"image {image.shape[::-1]} and mask {mask.shape[::-1]} differ in size")
        return None
    try:
        labels, snapped = map_mask_values(mask, job.values, job.num_classes, job.snap)
    except DataError as e:
        raise DataError(f"mask '{job.root / pair.mask}' {e}.") from e
    if snapped:
        moved = ", ".join(f"{v} -> {to:g} ({n} px)" for v, (n, to) in snapped.items())
        prepared.notes.append(f"{pair.mask}: values not in --mask-values snapped to the nearest: {moved}")
    return image, labels


def _prepare_pair(job: _Job, pair: Pair, group: str, where: str, prepared: Prepared, stats: dict) -> None:
    """Read, resample, crop and tile one image and its mask into split ``where``, counting into ``stats``."""
    read = _read_pair(job, pair, prepared)
    if read is None:
        return
    image, labels = read
    source = job.sizes[pair.image]
    spacing = job.target or source or (1.0, 1.0)
    if job.target and source:
        ratio = (source[0] / job.target[0], source[1] / job.target[1])
        image, labels = resample(image, labels, ratio, job.num_classes)
    rows, cols = image.shape
    (left, right), (top, bottom) = central_span(cols, job.crop), central_span(rows, job.crop)
    tile = job.tile
    origins = [(left, top)]
    if tile:
        xs, ys = tile_origins(right - left, tile, job.tile_overlap), tile_origins(bottom - top, tile, job.tile_overlap)
        origins = [(left + x, top + y) for y in ys for x in xs]
    st = stats[where]
    st["images"] += 1
    st["groups"].add(group)
    for x0, y0 in origins:
        y1, x1 = (y0 + tile, x0 + tile) if tile else (bottom, right)
        cut = tile or (right - left, bottom - top) != (cols, rows)
        name = job.out_names[pair.image] + (f"_x{x0:05d}_y{y0:05d}" if cut else "")
        origin = (x0 * spacing[0], y0 * spacing[1])
        piece, piece_labels = image[y0:y1, x0:x1], labels[y0:y1, x0:x1]
        image_path = write_image(job.out / "images" / (name + job.suffix), piece, spacing, origin, job.unit)
        label_path = write_image(job.out / "labels" / (name + job.suffix), piece_labels, spacing, origin, job.unit)
        entry = {"image": relative(image_path, job.out), "label": relative(label_path, job.out)}
        prepared.entries[where].append(entry)
        counts = np.bincount(piece_labels.ravel(), minlength=job.num_classes)
        st["items"] += 1
        st["present"] += counts > 0
        st["pixels"] += counts
        prepared.sources.append(
            {"split": where, **entry, "source_image": pair.image, "source_mask": pair.mask, "group": group,
             "x0": x0, "y0": y0, "source_pixel_size": list(source) if source else None,
             "pixel_size_from": job.size_origin[pair.image], "shape": list(piece.shape[::-1])}
        )  # fmt: skip


def _pair(values: Sequence[float] | None, option: str) -> tuple[float, float] | None:
    if not values:
        return None
    if len(values) > 2 or any(v <= 0 for v in values):
        raise DataError(f"{option} {values}: give one positive size, or two (x,y).")
    return (float(values[0]), float(values[-1]))


def _summarise(prepared: Prepared, stats: dict, names: Sequence[str], tiled: bool) -> None:
    for split, st in stats.items():
        if not st["items"]:
            continue
        total = max(int(st["pixels"].sum()), 1)
        prepared.splits[split] = {
            "items": st["items"],
            "source_images": st["images"] if tiled else None,
            "groups": sorted(st["groups"]),
            "classes": {
                name: f"in {int(st['present'][c])} of {st['items']} items, {100 * st['pixels'][c] / total:.1f}% of "
                "pixels"
                for c, name in enumerate(names)
            },
        }
        absent = [names[c] for c in range(len(names)) if not st["present"][c]]
        if absent:
            prepared.notes.append(f"{split}: class(es) {', '.join(absent)} appear in no label map")


def _hints(out: Path, spacing_hint: list[float] | None, png: bool) -> list[str]:
    hints = [f"python -m medkd check-data --datalist {out / 'dataset.json'} --key all"]
    pixdim = "[1.0, 1.0]" if png else str(spacing_hint) if spacing_hint else None
    hints.append(
        "cd bundles/segmentation_2d && python -m monai.bundle run --config_file \"['configs/train.json',"
        f"'configs/train_teacher.json']\" --dataset_dir {out}"
        + (f' --pixdim "{pixdim}"' if pixdim else "")
        + "  # then the other stages"
    )
    if png:
        hints.append("PNG files hold no pixel spacing, so the bundle's --pixdim is in pixels: keep [1.0, 1.0].")
    elif not spacing_hint:
        hints.append("The plan resamples every image to their median pixel size (pixdim); --pixdim sets another.")
    return hints
