"""The real data shipped with medkd: the segmentation bundles' embedded defaults (SEM in 2D, hippocampus MRI in 3D)."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tomllib
from bundle_utils import BUNDLES, REPO

from medkd.bundles import stage_config
from medkd.data.checks import check_datalist
from medkd.data.loading import DataError, load_datalist
from medkd.data.synthetic import SAMPLE_DATA, ensure_default_data, ensure_shipped_data

SPLITS = ("training", "validation", "test")


def _copied_default(bundle: str, tmp_path: Path) -> tuple[str, dict]:
    """The bundle's embedded default data (its merged train config's ``default_data``) copied as its first run does:
    the datalist path and content."""
    default = stage_config(BUNDLES / bundle, "train")["default_data"]
    datalist = ensure_default_data(str(tmp_path / "data"), str(tmp_path), default)
    return datalist, json.loads(Path(datalist).read_text())


def test_the_bundle_copies_the_sem_subset_and_it_passes_the_data_check(tmp_path):
    datalist, data = _copied_default("segmentation_2d", tmp_path)
    assert data["labels"] == {"0": "background", "1": "myelin", "2": "axon"}
    assert [len(data[k]) for k in SPLITS] == [6, 2, 2]
    groups = {k: {e["image"].split("_")[0] for e in data[k]} for k in SPLITS}
    assert groups == {  # split by rat, as the data set's README asks
        "training": {"images/sub-rat1", "images/sub-rat3", "images/sub-rat5", "images/sub-rat7"},
        "validation": {"images/sub-rat4", "images/sub-rat6"},
        "test": {"images/sub-rat2", "images/sub-rat8"},
    }
    assert (tmp_path / "data" / "LICENSE").read_text().startswith("MIT License")
    assert "10.5281/zenodo.5498378" in (tmp_path / "data" / "README.md").read_text(encoding="utf-8")
    for key in SPLITS:
        assert check_datalist(load_datalist(datalist, key=key), num_classes=3) == []
    image = nib.load(str(tmp_path / "data" / data["test"][0]["image"]))
    label = np.asarray(nib.load(str(tmp_path / "data" / data["test"][0]["label"])).dataobj)
    assert np.allclose(image.header.get_zooms()[:2], 0.2) and max(image.shape) == 384
    assert set(np.unique(label)) == {0, 1, 2}
    (tmp_path / "data" / "dataset.json").write_text(json.dumps({**data, "test": data["test"][:1]}))
    ensure_shipped_data(str(tmp_path / "data"), "sem_axon_myelin")  # a datalist already there is kept
    assert len(json.loads((tmp_path / "data" / "dataset.json").read_text())["test"]) == 1


def test_the_3d_bundle_copies_the_hippocampus_subset_split_by_case(tmp_path):
    datalist, data = _copied_default("segmentation_3d", tmp_path)
    assert data["labels"] == {"0": "background", "1": "anterior", "2": "posterior"}
    assert [len(data[k]) for k in SPLITS] == [40, 10, 10]
    cases = {k: {Path(e["image"]).name for e in data[k]} for k in SPLITS}
    assert sum(len(c) for c in cases.values()) == 60 == len(set.union(*cases.values()))  # each case in one list
    assert "CC BY-SA 4.0" in (tmp_path / "data" / "LICENSE").read_text()
    readme = (tmp_path / "data" / "README.md").read_text(encoding="utf-8")
    assert "medicaldecathlon.com" in readme and "benchmarks/hippocampus_subset.py" in readme
    for key in SPLITS:
        assert check_datalist(load_datalist(datalist, key=key), num_classes=3) == []
        for entry in data[key]:
            assert Path(entry["label"]).name == Path(entry["image"]).name
            image = nib.load(str(tmp_path / "data" / entry["image"]))
            label = np.asarray(nib.load(str(tmp_path / "data" / entry["label"])).dataobj)
            assert image.shape == label.shape and np.allclose(image.header.get_zooms(), 1.0)
            assert set(np.unique(label)) == {0, 1, 2}  # both parts of the hippocampus in every case


def test_missing_sample_data_is_named(tmp_path):
    with pytest.raises(DataError, match="'no_such_set' is missing"):
        ensure_shipped_data(str(tmp_path / "data"), "no_such_set")


def test_every_sample_file_is_package_data():
    """A non-editable install (the docker image) carries them: pyproject's package-data globs match each file."""
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["medkd"]
    files = [p.relative_to(SAMPLE_DATA.parent) for p in SAMPLE_DATA.rglob("*") if p.is_file()]
    assert len(files) >= 20
    assert all(any(fnmatch.fnmatch(f.as_posix(), pattern) for pattern in patterns) for f in files)
