"""``prepare classification``: an image-folder layout (``<root>/<split>/<class>/*`` or ``<root>/<class>/*``) →
a Decathlon ``dataset.json`` with integer labels, a stratified validation hold-out that keeps groups (and
near-duplicate images) together, and greyscale copies of colour images for the one-channel bundles."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from medkd.data.duplicates import DEFAULT_MAX_DISTANCE, find_duplicates
from medkd.data.loading import PIL_SUFFIXES, DataError, is_image_file
from medkd.data.splits import Unit, group_of, group_regex, hold_out, relative
from medkd.prepare.output import Prepared, output_folder, shown, write_prepared
from medkd.prepare.pixels import GREY_MODES, to_grey
from medkd.prepare.splits import SPLITS, split_of

__all__ = ["Source", "prepare_classification", "scan_image_folder"]

DUPLICATE_POLICIES = ("group", "drop", "ignore")
_KEEP_ORDER = {"test": 0, "validation": 1, "training": 2}  # --duplicates drop keeps the test image of a group


@dataclass(frozen=True)
class Source:
    """An image of the folder: its path relative to the root, the split its folder names (or ``None``), its class."""

    path: str
    split: str | None
    class_name: str


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _class_images(folder: Path, root: Path, split: str | None, ignored: list[dict]) -> list[Source]:
    found = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        if is_image_file(path):
            found.append(Source(rel, split, folder.name))
        else:
            ignored.append({"path": rel, "reason": "not an image format the loaders read"})
    return found


def scan_image_folder(root: str | Path) -> tuple[list[Source], list[dict], str]:
    """The images of an image-folder layout, the files left out (with why), and the layout found.

    ``<root>/<split>/<class>/...`` when a top-level folder is named like a split (``Training``/``train``,
    ``Validation``/``val``, ``Testing``/``test``; other top-level folders are left out), else ``<root>/<class>/...``.
    Images may lie in sub-folders of a class folder.

    Raises:
        DataError: the root is not a folder, or holds no class folder with images.
    """
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise DataError(f"--root '{root}' is not a folder. Pass the folder that holds the class (or split) folders.")
    top = [p for p in _visible(root) if p.is_dir()]
    ignored = [{"path": p.name, "reason": "file at the top level, not in a class folder"} for p in _visible(root)
               if p.is_file()]  # fmt: skip
    splits = {p: split_of(p.name) for p in top}
    sources: list[Source] = []
    if any(splits.values()):
        named = Counter(s for s in splits.values() if s)
        twice = [s for s, n in named.items() if n > 1]
        if twice:
            folders = [p.name for p, s in splits.items() if s in twice]
            raise DataError(f"--root '{root}' has several folders for one split ({folders}); merge them.")
        layout = "<root>/<split>/<class>/*: " + ", ".join(f"{p.name} -> {s}" for p, s in splits.items() if s)
        for folder, split in splits.items():
            if split is None:
                ignored.append({"path": folder.name + "/", "reason": "top-level folder that is not a split name"})
                continue
            for class_folder in (p for p in _visible(folder) if p.is_dir()):
                sources += _class_images(class_folder, root, split, ignored)
            ignored += [{"path": f.relative_to(root).as_posix(), "reason": "file outside the class folders"}
                        for f in _visible(folder) if f.is_file()]  # fmt: skip
    else:
        layout = "<root>/<class>/* (no split folders)"
        for class_folder in top:
            sources += _class_images(class_folder, root, None, ignored)
    if not sources:
        held = ", ".join(p.name + ("/" if p.is_dir() else "") for p in _visible(root)[:8]) or "nothing"
        raise DataError(
            f"--root '{root}' holds no images in class folders (it holds: {held}). Expected <root>/<class>/*.png or "
            "<root>/<split>/<class>/*.png with split folders named Training/Validation/Testing (or train/val/test)."
        )
    return sources, ignored, layout


class _Groups:
    """Union-find over names: images of one group (``--group-by``) or of one duplicate group move together."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, name: str) -> str:
        self.parent.setdefault(name, name)
        while self.parent[name] != name:
            self.parent[name] = self.parent[self.parent[name]]
            name = self.parent[name]
        return name

    def join(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _split_order(source: Source) -> tuple[int, str]:
    return _KEEP_ORDER.get(source.split or "training", 3), source.path


def prepare_classification(
    root: str | Path,
    output: str | Path,
    val_fraction: float = 0.1,
    test_fraction: float = 0.0,
    seed: int = 0,
    group_by: str | None = None,
    greyscale: bool = True,
    copy: bool = False,
    duplicates: str = "group",
    duplicate_distance: int = DEFAULT_MAX_DISTANCE,
    overwrite: bool = False,
    progress: bool = True,
) -> Prepared:
    """Prepare an image-folder classification layout for the classification bundle (see ``docs/data.md``).

    Class names are the class folder names, sorted (label = index). Splits come from the split folders; without a
    validation folder, ``val_fraction`` of the training images is held out, stratified by class, reproducible by
    ``seed`` (likewise ``test_fraction`` without a test folder). Held-out units are whole groups: images sharing a
    ``group_by`` match (a regex over the path relative to ``root``) and, with ``duplicates="group"``, near-duplicate
    images. ``duplicates="drop"`` keeps one image of each duplicate group (test first, then validation, then
    training). With ``greyscale``, images that are not one-channel are written as greyscale PNG into the output
    folder; the others are referenced in place (``copy``: written too).

    Writes ``dataset.json``, ``prepare.json`` and ``sources.csv`` into ``output`` (see
    :func:`medkd.prepare.output.write_prepared`) and returns what was decided.

    Raises:
        DataError: naming the folder or option and the fix.
    """
    if duplicates not in DUPLICATE_POLICIES:
        raise DataError(f"--duplicates {duplicates!r} must be one of {', '.join(DUPLICATE_POLICIES)}.")
    sources, ignored, layout = scan_image_folder(root)
    root = Path(root).expanduser().absolute()
    regex = group_regex(group_by)
    if regex is not None:
        unmatched = [s.path for s in sources if group_of(s.path, regex) is None]
        if unmatched:
            raise DataError(
                f"--group-by {group_by!r} matches nothing in {shown(unmatched)} (it is searched in the path relative "
                "to --root); fix the expression."
            )
    class_names = sorted({s.class_name for s in sources})
    out = output_folder(output, root, overwrite)
    prepared = Prepared("classification", str(root), str(out), class_names)
    prepared.settings = {
        "layout": layout,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "seed": seed,
        "group_by": group_by,
        "greyscale": greyscale,
        "copy": copy,
        "duplicates": duplicates,
        "duplicate_distance": duplicate_distance,
    }
    prepared.dropped += ignored
    groups = _Groups()
    for i, s in enumerate(sources):
        groups.join(f"item:{i}", f"group:{group_of(s.path, regex)}" if regex else f"item:{i}")
    kept = list(range(len(sources)))
    if duplicates != "ignore":
        kept = _duplicates(prepared, sources, groups, duplicates, duplicate_distance, root, progress)
    split_of_item = _splits(prepared, sources, kept, groups, val_fraction, test_fraction, seed)
    _write(prepared, sources, kept, split_of_item, root, out, greyscale, copy, progress)
    _summarise(prepared, sources, kept, split_of_item, groups, bool(group_by or duplicates == "group"))
    prepared.hints = [
        f"python -m medkd check-data --datalist {out / 'dataset.json'} --key all",
        "cd bundles/classification_2d && python -m monai.bundle run --config_file \"['configs/train.json',"
        f"'configs/train_teacher.json']\" --dataset_dir {out}  # then the other stages",
    ]
    write_prepared(prepared)
    return prepared


def _duplicates(
    prepared: Prepared,
    sources: Sequence[Source],
    groups: _Groups,
    policy: str,
    distance: int,
    root: Path,
    progress: bool,
) -> list[int]:
    """Find duplicate images; join them into one group (``group``) or keep one per group (``drop``)."""
    lists: dict[str, list[dict]] = defaultdict(list)
    order: list[int] = []
    for s in sources:
        lists[s.split or "all"].append({"image": str(root / s.path), "label": s.class_name})
    for split in lists:
        order += [i for i, s in enumerate(sources) if (s.split or "all") == split]
    report = find_duplicates(lists, distance, progress=progress)
    crossing = sum(len({report.splits[i] for i in g}) > 1 for g in report.groups)
    conflicts = sum(len({report.labels[i] for i in g}) > 1 for g in report.groups)
    prepared.extra["duplicates"] = {
        "groups": len(report.groups),
        "images_in_groups": sum(len(g) for g in report.groups),
        "groups_across_split_folders": crossing,
        "pairs_across_split_folders": len(report.leakage),
        "groups_with_different_classes": conflicts,
        "seconds": round(report.seconds, 1),
        "policy": policy,
    }
    prepared.notes.append(report.summary())
    if conflicts:
        prepared.notes.append(f"{conflicts} duplicate group(s) hold images of different classes (label noise)")
    dropped: set[int] = set()
    for group in report.groups:
        members = sorted((order[i] for i in group), key=lambda i: _split_order(sources[i]))
        if policy == "drop":
            for i in members[1:]:
                dropped.add(i)
                prepared.drop(sources[i].path, f"duplicate of {sources[members[0]].path} (--duplicates drop)")
        else:
            for i in members[1:]:
                groups.join(f"item:{members[0]}", f"item:{i}")
    if policy == "group" and report.leakage:
        prepared.notes.append(
            f"{len(report.leakage)} duplicate pair(s) lie in different split folders and stay there (leakage): "
            "python -m medkd check-data --key all lists them; --duplicates drop keeps one image per group"
        )
    return [i for i in range(len(sources)) if i not in dropped]


def _splits(
    prepared: Prepared,
    sources: Sequence[Source],
    kept: Sequence[int],
    groups: _Groups,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> dict[int, str]:
    """Split of each kept image: its folder's, or a stratified hold-out of whole groups from training."""
    split_of_item = {i: sources[i].split or "training" for i in kept}
    given = {s.split for s in sources if s.split}
    rng = np.random.default_rng(seed)
    for split, fraction in (("test", test_fraction), ("validation", val_fraction)):
        if split in given or fraction <= 0:
            continue
        if not 0 < fraction < 1:
            raise DataError(f"--{'val' if split == 'validation' else 'test'}-fraction {fraction} must be in [0, 1).")
        members: dict[str, list[int]] = defaultdict(list)
        for i in kept:
            if split_of_item[i] == "training":
                members[groups.find(f"item:{i}")].append(i)
        units = [
            Unit(name, Counter(sources[i].class_name for i in items).most_common(1)[0][0], len(items))
            for name, items in members.items()
        ]
        share = fraction / (1 - test_fraction) if split == "validation" and "test" not in given else fraction
        for name in hold_out(units, share, rng):
            for i in members[name]:
                split_of_item[i] = split
        prepared.notes.append(
            f"{split}: {fraction:g} of the training images held out, stratified by class, whole groups (seed {seed})"
        )
    return split_of_item


def _write(
    prepared: Prepared,
    sources: Sequence[Source],
    kept: Sequence[int],
    split_of_item: dict[int, str],
    root: Path,
    out: Path,
    greyscale: bool,
    copy: bool,
    progress: bool,
) -> None:
    """Datalist entries; greyscale (or all, with ``copy``) PNG copies of the images that need one."""
    conversions: Counter = Counter()
    modes: Counter = Counter()
    for i in tqdm(kept, desc="images", disable=not progress):
        s = sources[i]
        path = root / s.path
        target = path
        if s.path.lower().endswith(PIL_SUFFIXES):
            try:
                with Image.open(path) as image:
                    modes[image.mode] += 1
                    if copy or (greyscale and image.mode not in GREY_MODES):
                        image.load()
                        grey, note = to_grey(image) if greyscale else (image, None)
                        target = out / "images" / Path(s.path).with_suffix(".png")
                        target.parent.mkdir(parents=True, exist_ok=True)
                        grey.save(target)
                        conversions[note or "copied"] += 1
            except OSError as e:
                prepared.drop(s.path, f"cannot be read as an image ({type(e).__name__}: {e})")
                continue
        entry = {"image": relative(target, out), "label": prepared.class_names.index(s.class_name)}
        prepared.entries[split_of_item[i]].append(entry)
        prepared.sources.append({"split": split_of_item[i], **entry, "class": s.class_name, "source": s.path})
    if modes:
        prepared.extra["image_modes"] = dict(modes)
    for what, n in sorted(conversions.items()):
        prepared.notes.append(f"{n} image(s): {what}, written as PNG under {out / 'images'}")
    if not greyscale and any(m not in GREY_MODES for m in modes) and len(modes) > 1:
        prepared.notes.append(
            f"images of different channel counts ({dict(modes)}) cannot be batched together: leave out "
            "--keep-channels to convert them all to greyscale"
        )


def _summarise(
    prepared: Prepared,
    sources: Sequence[Source],
    kept: Sequence[int],
    split_of_item: dict[int, str],
    groups: _Groups,
    grouped: bool,
) -> None:
    for split in SPLITS:
        items = [i for i in kept if split_of_item[i] == split]
        if not items:
            continue
        counts = Counter(sources[i].class_name for i in items)
        n_groups = len({groups.find(f"item:{i}") for i in items})
        prepared.splits[split] = {"items": len(items)}
        if grouped:
            prepared.splits[split]["group_count"] = n_groups
        prepared.splits[split]["classes"] = {name: f"{counts.get(name, 0)} images" for name in prepared.class_names}
        absent = [name for name in prepared.class_names if not counts.get(name)]
        if absent:
            prepared.notes.append(f"{split}: no image of class(es) {', '.join(absent)}")
