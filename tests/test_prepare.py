"""Tests for ``python -m medkd prepare``: image-folder classification and images-plus-masks segmentation layouts."""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from bundle_utils import BUNDLES
from conftest import texture
from PIL import Image

from medkd.__main__ import main
from medkd.bundles import run_command
from medkd.data.checks import check_datalist
from medkd.data.labels import datalist_class_names
from medkd.data.loading import DataError, LoadMedicalImage, load_datalist
from medkd.data.splits import Unit, group_of, hold_out
from medkd.prepare import prepare_classification, prepare_segmentation
from medkd.prepare.pairing import find_sidecar, pair_files
from medkd.prepare.splits import parse_split_spec

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def image_folder(root: Path, counts: dict[str, dict[str, int]], seed: int = 0) -> Path:
    """``root/<split>/<class>/<n>.png`` (or ``root/<class>/...`` for the split ``""``), every image distinct."""
    for split, classes in counts.items():
        for class_name, n in classes.items():
            for i in range(n):
                seed += 1
                save(root / split / class_name / f"{class_name}{i:03d}.png", texture(seed))
    return root


def lists(output: Path) -> dict:
    return json.loads((output / "dataset.json").read_text())


def names(entries: list[dict]) -> set[str]:
    return {Path(e["image"]).name for e in entries}


# ------------------------------------------------------------------------------------------------ splitting


def test_hold_out_is_stratified_whole_groups_and_keeps_one():
    units = [Unit(f"a{i}", "a", 1) for i in range(20)] + [Unit(f"b{i}", "b", 2) for i in range(5)]
    taken = hold_out(units, 0.2, np.random.default_rng(0))
    assert sum(u.name.startswith("a") for u in units if u.name in taken) == 4
    assert sum(u.name.startswith("b") for u in units if u.name in taken) == 1  # 2 of 10 items, one group
    assert hold_out([Unit("x", None, 3), Unit("y", None, 3)], 0.01, np.random.default_rng(0)) in ({"x"}, {"y"})
    assert hold_out([Unit("x", None, 3)], 0.5, np.random.default_rng(0)) == set()  # never the last group
    assert parse_split_spec(["train=r1,r2", "val=r3"]) == {"training": ["r1", "r2"], "validation": ["r3"]}
    assert parse_split_spec(["train=0.8", "test=0.2"]) == {"training": 0.8, "test": 0.2}
    with pytest.raises(DataError, match="puts group 'r1' in both training and test"):
        parse_split_spec(["train=r1", "test=r1"])
    with pytest.raises(DataError, match="SPLIT=GROUP"):
        parse_split_spec(["holdout=r1"])


# ----------------------------------------------------------------------------------------- classification


def test_classification_split_folders_labels_map_and_check(tmp_path, capsys):
    counts = {"Training": {"dog": 3, "cat": 4}, "Validation": {"cat": 1, "dog": 1}, "Testing": {"cat": 2, "dog": 1}}
    root = image_folder(tmp_path / "raw", counts)
    (root / "README.txt").write_text("about")
    (root / "Training" / "cat" / "notes.txt").write_text("x")
    out = tmp_path / "prepared"
    assert main(["prepare", "classification", "--root", str(root), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    data = lists(out)
    assert data["labels"] == {"0": "cat", "1": "dog"}  # sorted folder names
    assert datalist_class_names(str(out / "dataset.json")) == ["cat", "dog"]
    assert [len(data[k]) for k in ("training", "validation", "test")] == [7, 2, 3]  # no hold-out: a val folder
    assert {e["label"] for e in data["training"] if "/cat/" in e["image"]} == {0}
    assert Counter(e["label"] for e in data["test"]) == {0: 2, 1: 1}
    assert Path(data["training"][0]["image"]).is_absolute()  # greyscale PNGs are referenced where they are
    assert "training: 7 items" in printed and "  cat: 4 images" in printed
    assert "Training/cat/notes.txt: not an image format the loaders read" in printed
    report = json.loads((out / "prepare.json").read_text())
    assert report["layout"] == "classification" and report["splits"]["test"]["items"] == 3
    assert f"cd bundles/classification_2d && {run_command(BUNDLES / 'classification_2d', 'train_teacher')}" in printed
    assert report["duplicates"]["groups"] == 0
    for key in ("training", "validation", "test"):  # what a bundle checks before training
        items = load_datalist(out / "dataset.json", key=key)
        assert check_datalist(items, num_classes=2, task="classification") == []
    assert main(["prepare", "classification", "--root", str(root), "--output", str(out)]) == 1
    refusal = capsys.readouterr().out
    assert refusal.startswith(f"ERROR: --output '{out}' already holds dataset.json") and "--overwrite" in refusal
    assert main(["prepare", "classification", "--root", str(root), "--output", str(out), "--overwrite"]) == 0


def test_classification_stratified_holdout_is_reproducible(tmp_path):
    root = image_folder(tmp_path / "raw", {"train": {"a": 20, "b": 10, "c": 30}, "test": {"a": 2, "b": 2, "c": 2}})

    def split(seed: int, name: str) -> dict:
        prepare_classification(root, tmp_path / name, val_fraction=0.2, seed=seed, progress=False)
        return lists(tmp_path / name)

    first, again, other = split(0, "s0"), split(0, "s0b"), split(1, "s1")
    assert Counter(e["label"] for e in first["validation"]) == {0: 4, 1: 2, 2: 6}  # 20% of each class
    assert Counter(e["label"] for e in first["training"]) == {0: 16, 1: 8, 2: 24}
    assert first["validation"] == again["validation"] and first["training"] == again["training"]
    assert names(first["validation"]) != names(other["validation"])
    assert not names(first["training"]) & names(first["validation"])
    assert len(first["test"]) == 6


def test_classification_flat_layout_greyscale_and_duplicates(tmp_path, capsys):
    root = tmp_path / "raw"
    for cls, seeds in (("benign", range(10)), ("malignant", range(10, 20))):
        for s in seeds:
            save(root / cls / f"{cls}_{s}.png", texture(s))
    colour = np.stack([texture(50), texture(51), texture(52)], axis=2)
    save(root / "benign" / "colour.png", colour)
    grey_rgb = np.repeat(texture(53)[..., None], 3, axis=2)
    save(root / "malignant" / "grey_as_rgb.png", grey_rgb)
    save(root / "benign" / "copy_of_0.png", texture(0))  # a duplicate: must follow benign_0 into its split
    out = tmp_path / "out"
    argv = ["prepare", "classification", "--root", str(root), "--output", str(out), "--val-fraction", "0.3"]
    assert main([*argv, "--test-fraction", "0.2", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    data = lists(out)
    assert sum(len(data[k]) for k in ("training", "validation", "test")) == 23
    split_of = {Path(e["image"]).stem: key for key in ("training", "validation", "test") for e in data[key]}
    assert split_of["copy_of_0"] == split_of["benign_0"]
    assert "1 group(s) of duplicates (1 exact" in printed
    entries = {Path(e["image"]).stem: e for key in ("training", "validation", "test") for e in data[key]}
    loader = LoadMedicalImage(ensure_channel_first=True)
    for stem in ("colour", "grey_as_rgb"):
        image = entries[stem]["image"]
        assert not Path(image).is_absolute() and image.endswith(".png")  # written into --output
        assert tuple(loader(out / image).shape) == (1, 32, 32)
    assert Path(entries["benign_1"]["image"]).is_absolute()  # greyscale images stay where they are
    assert (np.asarray(Image.open(out / entries["grey_as_rgb"]["image"])) == texture(53)).all()  # not re-weighted
    assert "1 image(s): colour image converted to greyscale (luma)" in printed
    assert "1 image(s): grey image stored as RGB: one channel kept" in printed
    for key in ("training", "validation", "test"):
        assert check_datalist(load_datalist(out / "dataset.json", key=key), 2, task="classification") == []
    assert main([*argv, "--overwrite", "--duplicates", "drop"]) == 0
    data = lists(out)
    kept = {Path(e["image"]).stem for key in ("training", "validation") for e in data[key]}
    assert len(kept) == 22 and len({"copy_of_0", "benign_0"} & kept) == 1
    report = json.loads((out / "prepare.json").read_text())
    assert any("(--duplicates drop)" in d["reason"] for d in report["dropped"])


def test_classification_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["prepare", "classification", "--root", str(tmp_path / "empty"), "--output", str(tmp_path / "o")]) == 1
    assert "holds no images in class folders" in capsys.readouterr().out
    root = image_folder(tmp_path / "raw", {"": {"a": 2, "b": 2}})
    with pytest.raises(DataError, match="overlap"):
        prepare_classification(root, root / "prepared", progress=False)
    with pytest.raises(DataError, match="matches nothing in"):
        prepare_classification(root, tmp_path / "o", group_by=r"patient(\d+)", progress=False)


# ------------------------------------------------------------------------------------------- segmentation


def sem_like(root: Path, rats: dict[str, list[float]], size: tuple[int, int] = (24, 16)) -> Path:
    """BIDS-like ``sub-<rat>/micr/<name>_SEM.png`` images (one with alpha) with JSON sidecars (one inherited by
    several images) and ``derivatives/labels/.../<name>_SEM_seg-manual.png`` masks holding 0/127/255 and a stray
    130 and 240."""
    n = 0
    for rat, pixel_sizes in rats.items():
        micr = root / f"sub-{rat}" / "micr"
        for k, pixel_size in enumerate(pixel_sizes):
            stem = f"sub-{rat}_sample-{k}_SEM"
            image = texture(n, max(size))[: size[1], : size[0]]
            n += 1
            if rat == "r2":
                image = np.stack([image, np.full_like(image, 200)], axis=2)  # LA: alpha to drop
            save(micr / f"{stem}.png", image)
            mask = np.zeros((size[1], size[0]), np.uint8)
            mask[: size[1] // 2, :] = 127
            mask[size[1] // 2 :, size[0] // 2 :] = 255
            mask[0, 0], mask[-1, -1] = 130, 240
            save(root / "derivatives" / "labels" / f"sub-{rat}" / "micr" / f"{stem}_seg-manual.png", mask)
            sidecar = {"PixelSize": [pixel_size, pixel_size], "PixelSizeUnits": "um"}
            if len(pixel_sizes) > 1:  # BIDS inheritance: one sidecar for all images of this rat
                (micr / f"sub-{rat}_SEM.json").write_text(json.dumps(sidecar))
            else:
                (micr / f"{stem}.json").write_text(json.dumps(sidecar))
    return root


SEG = ["--images", "sub-*/micr/*_SEM.png", "--masks", "derivatives/labels/sub-*/micr/*_SEM_seg-manual.png"]
VALUES = ["--mask-values", "0,127,255", "--class-names", "background,myelin,axon"]


def test_segmentation_explicit_groups_values_resampling_alpha(tmp_path, capsys):
    root = sem_like(tmp_path / "raw", {"r1": [0.2, 0.2], "r2": [0.1], "r3": [0.05], "r4": [0.1]})
    out = tmp_path / "prepared"
    argv = ["prepare", "segmentation", "--root", str(root), "--output", str(out), *SEG, *VALUES]
    argv += ["--group-by", r"sub-(r\d+)", "--split", "val=r3", "test=r4", "--pixel-size", "0.1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    data = lists(out)
    assert data["labels"] == {"0": "background", "1": "myelin", "2": "axon"}
    assert [len(data[k]) for k in ("training", "validation", "test")] == [3, 1, 1]  # unlisted r1, r2 -> training
    sources = (out / "sources.csv").read_text().splitlines()
    by_image = {row.split(",")[1]: row for row in sources[1:]}
    assert all("sub-r1" in by_image[e["image"]] or "sub-r2" in by_image[e["image"]] for e in data["training"])
    assert "training: 3 items, 2 groups (r1, r2)" in printed
    loader = LoadMedicalImage(image_only=True)
    expected = {"r1": (48, 32), "r2": (24, 16), "r3": (12, 8), "r4": (24, 16)}  # 24x16 px at 0.2/0.1/0.05 -> 0.1
    for key in ("training", "validation", "test"):
        for entry in load_datalist(out / "dataset.json", key=key):
            rat = next(r for r in expected if f"sub-{r}_" in entry["image"])
            image, label = loader(entry["image"]), loader(entry["label"])
            assert tuple(image.shape) == expected[rat] == tuple(label.shape)  # (columns, rows), like MONAI's PNGs
            assert np.allclose(image.pixdim[:2], [0.1, 0.1])
            assert set(np.unique(np.asarray(label)).tolist()) == {0, 1, 2}
        assert check_datalist(load_datalist(out / "dataset.json", key=key), num_classes=3) == []
    header = nib.load(str(out / "images" / "sub-r2_sample-0_SEM.nii.gz")).header
    assert header.get_xyzt_units()[0] == "micron"
    # no resampling at 0.1: the NIfTI image holds exactly the PNG's pixels, in MONAI's axis order
    png = LoadMedicalImage()(str(root / "sub-r4" / "micr" / "sub-r4_sample-0_SEM.png"))
    assert np.array_equal(np.asarray(loader(str(out / "images" / "sub-r4_sample-0_SEM.nii.gz"))), np.asarray(png))
    label = np.asarray(loader(str(out / "labels" / "sub-r4_sample-0_SEM.nii.gz")))
    assert label[0, 0] == 1 and label[-1, -1] == 2  # 130 snapped to 127 (myelin), 240 to 255 (axon)
    assert "130 -> 127 (1 px), 240 -> 255 (1 px)" in printed
    assert "sub-r2/micr/sub-r2_sample-0_SEM.png: alpha channel dropped" in printed
    report = json.loads((out / "prepare.json").read_text())
    assert report["mask_values"] == {"0": 0, "127": 1, "255": 2}
    assert report["settings"]["pixel_size_unit"] == "um"
    assert '--pixdim "[0.1, 0.1]"' in printed
    assert f"cd bundles/segmentation_2d && {run_command(BUNDLES / 'segmentation_2d', 'train_teacher')}" in printed


def test_segmentation_fraction_split_keeps_groups_and_tiles(tmp_path):
    root = sem_like(tmp_path / "raw", {f"r{i}": [0.1, 0.1, 0.1] for i in range(1, 7)}, size=(40, 24))

    def run(name: str, seed: int):
        return prepare_segmentation(
            root, tmp_path / name, SEG[1], SEG[3], mask_values=[0, 127, 255], group_by=r"sub-(r\d+)",
            val_fraction=0.2, test_fraction=0.2, seed=seed, tile=16, tile_overlap=4, progress=False,
        )  # fmt: skip

    prepared = run("a", 0)
    groups = {s: set(prepared.splits[s]["groups"]) for s in prepared.splits}
    assert sorted(len(g) for g in groups.values()) == [1, 1, 4]  # 20% of 18 images: one rat (3 images) each
    assert not (groups["training"] & groups["validation"]) and not (groups["training"] & groups["test"])
    assert {row["group"] for row in prepared.sources if row["split"] == "test"} == groups["test"]
    tiles = [row for row in prepared.sources if row["source_image"].endswith("sub-r1_sample-0_SEM.png")]
    assert sorted({(row["x0"], row["y0"]) for row in tiles}) == [(x, y) for x in (0, 12, 24) for y in (0, 8)]
    assert all(row["shape"] == [16, 16] for row in tiles)
    tile = next(row for row in tiles if (row["x0"], row["y0"]) == (12, 8))
    affine = nib.load(str(tmp_path / "a" / tile["image"])).affine
    assert np.allclose(affine[:2, 3], [1.2, 0.8]) and np.allclose(np.diag(affine)[:2], [0.1, 0.1])
    assert run("b", 0).splits == prepared.splits and run("c", 5).splits != prepared.splits


def test_segmentation_errors_name_the_fix(tmp_path):
    root = sem_like(tmp_path / "raw", {"r1": [0.1], "r2": [0.1]})
    (root / "sub-r2" / "micr" / "sub-r2_sample-0_SEM.json").unlink()
    out = tmp_path / "o"
    with pytest.raises(DataError, match=r"write the text '_SEM' into the pattern, e\.g\. --masks 'derivatives/labels/"
                       r"sub-\*/micr/\*_SEM_seg-manual\.png'"):  # fmt: skip
        prepare_segmentation(root, out, SEG[1], "derivatives/labels/sub-*/micr/*_seg-manual.png", progress=False)
    with pytest.raises(DataError, match="has 2 wildcard.* but --masks .* has 1"):
        prepare_segmentation(root, out, SEG[1], "derivatives/labels/sub-r1/micr/*_SEM_seg-manual.png", progress=False)
    with pytest.raises(DataError, match="sub-r2_sample-0_SEM.png have no JSON sidecar with 'PixelSize'"):
        prepare_segmentation(root, out, SEG[1], SEG[3], mask_values=[0, 127, 255], pixel_size=[0.1], progress=False)
    with pytest.raises(DataError, match=r"--mask-values \(e\.g\. --mask-values 0,127,130,240,255\)"):
        prepare_segmentation(root, out, SEG[1], SEG[3], progress=False)
    with pytest.raises(DataError, match=r"holds values \[130, 240\] not in --mask-values"):
        prepare_segmentation(root, out, SEG[1], SEG[3], mask_values=[0, 127, 255], snap=False, progress=False)
    with pytest.raises(DataError, match="lists the training groups but not r2"):
        prepare_segmentation(root, tmp_path / "o2", SEG[1], SEG[3], mask_values=[0, 127, 255],
                             group_by=r"sub-(r\d)", split=["train=r1"], progress=False)  # fmt: skip
    with pytest.raises(DataError, match=r"no image has .*the groups are: r1, r2"):
        prepare_segmentation(root, tmp_path / "o3", SEG[1], SEG[3], mask_values=[0, 127, 255],
                             group_by=r"sub-(r\d)", split=["test=rat2"], progress=False)  # fmt: skip
    with pytest.raises(DataError, match="3 names .* for 2 classes"):
        prepare_segmentation(root, tmp_path / "o4", SEG[1], SEG[3], mask_values=[0, 255], class_names=["a", "b", "c"],
                             progress=False)  # fmt: skip


def test_pairing_rule_per_case_folders_and_recursive_patterns(tmp_path):
    for case in ("a", "b"):
        save(tmp_path / case / "image.png", texture(1))
        save(tmp_path / case / "mask.png", np.zeros((32, 32), np.uint8))
    save(tmp_path / "c" / "image.png", texture(2))  # no mask
    pairs, lone_images, lone_masks = pair_files(tmp_path, "*/image.png", "*/mask.png")
    assert [(p.image, p.mask, p.key) for p in pairs] == [("a/image.png", "a/mask.png", ("a",)),
                                                         ("b/image.png", "b/mask.png", ("b",))]  # fmt: skip
    assert lone_images == ["c/image.png"] and lone_masks == []
    save(tmp_path / "imgs" / "x" / "y" / "k1.png", texture(3))
    save(tmp_path / "imgs" / "k2.png", texture(4))
    save(tmp_path / "segs" / "x" / "y" / "k1_seg.png", texture(3))
    save(tmp_path / "segs" / "k2_seg.png", texture(4))
    pairs, _, _ = pair_files(tmp_path, "imgs/**/*.png", "segs/**/*_seg.png")
    assert sorted(p.key for p in pairs) == [("", "k2"), ("x/y/", "k1")]
    assert group_of("sub-rat3/micr/a.png", re.compile(r"sub-(rat\d+)")) == "rat3"
    assert group_of("sub-rat3/micr/a.png", re.compile(r"sub-rat\d+")) == "sub-rat3"
    sidecar = tmp_path / "sub-r1" / "micr"
    sidecar.mkdir(parents=True)
    (sidecar / "sub-r1_SEM.json").write_text("{}")
    (sidecar / "sub-r1_TEM.json").write_text("{}")
    assert find_sidecar(sidecar / "sub-r1_sample-2_SEM.png", tmp_path) == sidecar / "sub-r1_SEM.json"
    (tmp_path / "SEM.json").write_text("{}")
    assert find_sidecar(tmp_path / "sub-r2" / "micr" / "sub-r2_SEM.png", tmp_path) == tmp_path / "SEM.json"


def sources(out: Path) -> list[dict]:
    with open(out / "sources.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_segmentation_crop_keeps_the_central_pixels_then_tiles(tmp_path):
    root = sem_like(tmp_path / "raw", {"r1": [0.1], "r2": [0.1]}, size=(40, 24))
    argv = ["prepare", "segmentation", "--root", str(root), *SEG, "--mask-values", "0,127,255"]
    argv += ["--group-by", r"sub-(r\d+)", "--split", "val=r2"]
    assert main([*argv, "--output", str(tmp_path / "c"), "--crop", "16"]) == 0
    source = LoadMedicalImage()(str(root / "sub-r1" / "micr" / "sub-r1_sample-0_SEM.png"))
    row = next(r for r in sources(tmp_path / "c") if r["group"] == "r1")
    assert (row["x0"], row["y0"], row["shape"]) == ("12", "4", "[16, 16]")
    crop = nib.load(str(tmp_path / "c" / row["image"]))
    assert np.array_equal(np.asarray(crop.dataobj), np.asarray(source)[12:28, 4:20])  # columns first, as MONAI
    assert np.allclose(crop.affine[:2, 3], [1.2, 0.4])
    assert main([*argv, "--output", str(tmp_path / "t"), "--crop", "20", "--tile", "10"]) == 0
    tiles = [(int(r["x0"]), int(r["y0"])) for r in sources(tmp_path / "t") if r["group"] == "r1"]
    assert sorted(tiles) == [(10, 2), (10, 12), (20, 2), (20, 12)]
    assert main([*argv, "--output", str(tmp_path / "bad"), "--crop", "0"]) == 1


def test_classification_finds_dicom_files_without_extension(tmp_path, capsys):
    from pydicom.data import get_testdata_file

    root = tmp_path / "raw"
    for cls, name in (("ct", "CT_small.dcm"), ("mr", "MR_small.dcm")):
        for i in range(5):  # named as PACS exports name them
            (root / cls).mkdir(parents=True, exist_ok=True)
            (root / cls / f"1.2.840.113619.2.{i}").write_bytes(Path(get_testdata_file(name)).read_bytes())
    (root / "ct" / "notes").write_text("not an image")
    out = tmp_path / "out"
    assert main(["prepare", "classification", "--root", str(root), "--output", str(out)]) == 0
    found = {Path(e["image"]).name for e in lists(out)["training"]}
    assert found == {f"1.2.840.113619.2.{i}" for i in range(5)} and len(lists(out)["training"]) == 10
    report = json.dumps(json.loads((out / "prepare.json").read_text()))
    assert "ct/notes" in report and "not an image format the loaders read" in report
    assert "No validation or test list: the bundles hold them out of the training list" in capsys.readouterr().out
