"""Tests for medkd.data.duplicates and check-data's duplicate and leakage report."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import texture
from PIL import Image

from medkd.__main__ import main
from medkd.data.duplicates import (
    _popcount,
    duplicate_groups,
    find_duplicates,
    hamming_distances,
    hash_images,
    near_duplicate_pairs,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def altered(image: np.ndarray, seed: int = 0, size: int = 150) -> np.ndarray:
    """A slightly noised, re-contrasted and rescaled copy."""
    rng = np.random.default_rng(seed)
    noisy = np.clip(image * 0.9 + 10 + rng.normal(0, 3, image.shape), 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(noisy).resize((size, size), Image.Resampling.BILINEAR))


def png(path: Path, array: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return str(path)


def datalist(tmp_path: Path, **lists) -> str:
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"labels": {"0": "a", "1": "b"}, **lists}))
    return str(path)


def test_hashes_find_exact_and_near_duplicates_only(tmp_path):
    paths = [png(tmp_path / f"d{i}.png", texture(i, size=128)) for i in range(6)]
    paths.append(png(tmp_path / "exact.png", texture(0, size=128)))
    paths.append(png(tmp_path / "near.png", altered(texture(1, size=128))))
    rgb = np.repeat(texture(2, size=128)[..., None], 3, axis=2)
    paths.append(png(tmp_path / "rgb.png", np.concatenate([rgb, np.full_like(rgb[..., :1], 255)], axis=2)))  # RGBA
    hashes = hash_images(paths, progress=False)
    pairs = near_duplicate_pairs(hashes, max_distance=12)
    found = {(Path(paths[p.a]).name, Path(paths[p.b]).name): p for p in pairs}
    assert set(found) == {("d0.png", "exact.png"), ("d1.png", "near.png"), ("d2.png", "rgb.png")}
    assert found[("d0.png", "exact.png")].exact and found[("d0.png", "exact.png")].distance == 0
    near = found[("d1.png", "near.png")]
    assert not near.exact and 0 < near.distance <= 12
    assert found[("d2.png", "rgb.png")].describe() == "near-duplicate, distance 0"  # same grey, not same pixels
    assert [p for p in near_duplicate_pairs(hashes, max_distance=-1)] == [found[("d0.png", "exact.png")]]
    distances = hamming_distances(hashes.perceptual[:6], hashes.perceptual[:6])
    assert distances[~np.eye(6, dtype=bool)].min() > 60  # distinct images are far apart
    assert duplicate_groups(4, pairs[:0]) == []


def test_popcount_fallback_matches_numpy():
    words = np.random.default_rng(0).integers(0, 2**63, size=(5, 4), dtype=np.uint64)
    expected = np.array([[bin(int(w)).count("1") for w in row] for row in words])
    assert (_popcount(words) == expected).all()
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
    assert (table[words.view(np.uint8).reshape(5, 4, 8)].sum(-1) == expected).all()


def test_nifti_copy_of_a_png_is_an_exact_duplicate(tmp_path):
    image = texture(3, 40)[:, :30]  # rows != columns: the axis order must match MONAI's
    a = png(tmp_path / "a.png", image)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(image.T), np.eye(4)), str(tmp_path / "a.nii.gz"))
    report = find_duplicates({"training": [{"image": a}], "test": [{"image": str(tmp_path / "a.nii.gz")}]})
    assert [(p.exact, p.distance) for p in report.pairs] == [(True, 0)]


def test_exact_duplicate_in_one_split_is_a_warning(tmp_path, capsys):
    items = [{"image": png(tmp_path / f"img{i}.png", texture(i, size=128)), "label": i % 2} for i in range(4)]
    items.append({"image": png(tmp_path / "copy.png", texture(0, size=128)), "label": 1})
    path = datalist(tmp_path, training=items)
    assert main(["check-data", "--datalist", path]) == 0
    out = capsys.readouterr().out
    assert "OK: 5 items checked" in out
    assert (
        "WARNING: [duplicate] training: 2 images (exact duplicates): img0.png, copy.png; labels differ: a != b" in out
    )
    assert "1 group(s) of duplicates (1 exact" in out and "0 group(s) across lists" in out
    assert "[leakage]" not in out


def test_near_duplicate_across_splits_is_leakage(tmp_path, capsys):
    train = [{"image": png(tmp_path / "train" / f"t{i}.png", texture(i, size=128)), "label": i % 2} for i in range(4)]
    test = [{"image": png(tmp_path / "test" / "x.png", altered(texture(2, size=128), size=100)), "label": 0}]
    test.append({"image": png(tmp_path / "test" / "y.png", texture(9, size=128)), "label": 1})
    path = datalist(tmp_path, training=train, test=test)
    assert main(["check-data", "--datalist", path, "--key", "all"]) == 1
    out = capsys.readouterr().out
    assert "[training] OK: 4 items checked" in out and "[test] OK: 2 items checked" in out
    leakage = [line.strip() for line in out.splitlines() if "[leakage]" in line]
    assert len(leakage) == 1, out
    assert leakage[0].startswith("[leakage] training:train/t2.png ~ test:test/x.png (near-duplicate, distance ")
    assert "Leakage: 1 pair(s) of duplicate images in different lists" in out
    report = tmp_path / "pairs.tsv"
    code = main(["check-data", "--datalist", path, "--key", "all", "--allow-duplicates", "--duplicates-report",
                 str(report)])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "WARNING: [leakage] training:train/t2.png ~ test:test/x.png" in out
    rows = report.read_text().splitlines()
    fields = rows[1].split("\t")
    assert rows[0].startswith("group\tkind\tdistance") and len(rows) == 2
    assert (fields[0], fields[1], fields[3], fields[5], fields[6]) == (
        "0",
        "near",
        "training",
        train[2]["image"],
        "test",
    )
    assert main(["check-data", "--datalist", path, "--key", "training,test", "--duplicate-distance", "-1"]) == 0
    assert "[leakage]" not in capsys.readouterr().out  # exact duplicates only: the altered copy is not one


def test_distinct_images_report_nothing(tmp_path, capsys):
    train = [{"image": png(tmp_path / f"t{i}.png", texture(i, size=128)), "label": i % 2} for i in range(6)]
    val = [{"image": png(tmp_path / f"v{i}.png", texture(10 + i, size=128)), "label": i % 2} for i in range(2)]
    path = datalist(tmp_path, training=train, validation=val)
    assert main(["check-data", "--datalist", path, "--key", "all"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "Task: classification (every label is a class index or name; pass --task to override)",
        "[training] OK: 6 items checked",
        "[validation] OK: 2 items checked",
    ]
    assert main(["check-data", "--datalist", path, "--key", "test"]) == 1  # an unknown list is still named
    assert "has no 'test' list" in capsys.readouterr().out
