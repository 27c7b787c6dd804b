"""The real data shipped with medkd: the 2D segmentation bundle's embedded default."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tomllib
from bundle_utils import REPO

from medkd.data.checks import check_datalist
from medkd.data.loading import DataError, load_datalist
from medkd.data.synthetic import SAMPLE_DATA, ensure_default_data, ensure_shipped_data


def test_the_bundle_copies_the_sem_subset_and_it_passes_the_data_check(tmp_path):
    default = json.loads((REPO / "bundles" / "segmentation_2d" / "configs" / "train.json").read_text())["default_data"]
    datalist = ensure_default_data(str(tmp_path / "data"), str(tmp_path), default)
    data = json.loads(Path(datalist).read_text())
    assert data["labels"] == {"0": "background", "1": "myelin", "2": "axon"}
    assert [len(data[k]) for k in ("training", "validation", "test")] == [6, 2, 2]
    groups = {k: {e["image"].split("_")[0] for e in data[k]} for k in ("training", "validation", "test")}
    assert groups == {  # split by rat, as the data set's README asks
        "training": {"images/sub-rat1", "images/sub-rat3", "images/sub-rat5", "images/sub-rat7"},
        "validation": {"images/sub-rat4", "images/sub-rat6"},
        "test": {"images/sub-rat2", "images/sub-rat8"},
    }
    assert (tmp_path / "data" / "LICENSE").read_text().startswith("MIT License")
    assert "10.5281/zenodo.5498378" in (tmp_path / "data" / "README.md").read_text(encoding="utf-8")
    for key in ("training", "validation", "test"):
        assert check_datalist(load_datalist(datalist, key=key), num_classes=3) == []
    image = nib.load(str(tmp_path / "data" / data["test"][0]["image"]))
    label = np.asarray(nib.load(str(tmp_path / "data" / data["test"][0]["label"])).dataobj)
    assert np.allclose(image.header.get_zooms()[:2], 0.2) and max(image.shape) == 384
    assert set(np.unique(label)) == {0, 1, 2}
    (tmp_path / "data" / "dataset.json").write_text(json.dumps({**data, "test": data["test"][:1]}))
    ensure_shipped_data(str(tmp_path / "data"), "sem_axon_myelin")  # a datalist already there is kept
    assert len(json.loads((tmp_path / "data" / "dataset.json").read_text())["test"]) == 1


def test_missing_sample_data_is_named(tmp_path):
    with pytest.raises(DataError, match="'no_such_set' is missing"):
        ensure_shipped_data(str(tmp_path / "data"), "no_such_set")


def test_every_sample_file_is_package_data():
    """A non-editable install (the docker image) carries them: pyproject's package-data globs match each file."""
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["medkd"]
    files = [p.relative_to(SAMPLE_DATA.parent) for p in SAMPLE_DATA.rglob("*") if p.is_file()]
    assert len(files) >= 20
    assert all(any(fnmatch.fnmatch(f.as_posix(), pattern) for pattern in patterns) for f in files)
