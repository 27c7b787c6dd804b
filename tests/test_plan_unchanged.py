"""The planner's output, pinned: the plans of every bundle's embedded data set and of synthetic fingerprints are
those recorded in ``tests/data/expected_plans.json`` (made by medkd 2baa9b2's planner, before it became classes).

A planning change that is meant to change plans rewrites the file: ``python tests/test_plan_unchanged.py``, then
review its diff."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from bundle_utils import BUNDLES
from test_planning import fake_fingerprint

from medkd.data.synthetic import ensure_default_data
from medkd.planning import make_plan, make_settings

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

EXPECTED = Path(__file__).parent / "data" / "expected_plans.json"
DEVICES = ("cpu", "cuda")


def _fingerprint(size, spacing, training=None, classes=(), **kwargs):
    """:func:`test_planning.fake_fingerprint` with class counts and a 10th-percentile spacing below the median."""
    return fake_fingerprint(size, spacing, training=training, classes=classes,
                            percentile_10=[s * 0.8 for s in spacing], **kwargs)  # fmt: skip


LUNGS = {"classes": [1, 2], "names": ["left lung", "right lung"], "axis": 0, "found_by": ["name", "position"]}
# name -> (fingerprint, make_settings options)
SYNTHETIC: dict[str, tuple[dict, dict]] = {
    "2d_small_images": (_fingerprint((64, 60), (1.0, 1.0), cases=12), {}),
    "2d_large_rgb": (_fingerprint((1024, 900), (0.3, 0.3), cases=3000, channels=3), {}),
    "2d_lateral_ct": (_fingerprint((512, 512), (0.7, 0.7), cases=80, lateral=[LUNGS], ct=True), {}),
    "3d_isotropic": (_fingerprint((160, 160, 160), (1.0, 1.0, 1.0), cases=40), {}),
    "3d_thick_slices": (_fingerprint((512, 512, 40), (0.7, 0.7, 5.0), cases=300, ct=True), {}),
    "3d_two_channels_budget": (
        _fingerprint((96, 128, 80), (1.2, 1.0, 1.0), channels=2),
        {"voxel_budget": 2**20, "total_iterations": 4000, "samples_per_volume": 4},
    ),
    "cls_2d_balanced": (
        _fingerprint((224, 224), (1.0, 1.0), cases=500, classes=[("a", 250), ("b", 250)]),
        {"task": "classification"},
    ),
    "cls_2d_imbalanced_lateral": (
        _fingerprint(
            (300, 200),
            (1.0, 1.0),
            cases=90,
            training=60,
            classes=[("left", 80), ("right", 10)],
            lateral=[{"names": ["left", "right"], "axis": 0}],
        ),
        {"task": "classification", "lateral": True},
    ),  # fmt: skip
    "cls_3d": (
        _fingerprint((32, 32, 32), (1.0, 1.0, 1.0), cases=160, classes=[("x", 50), ("y", 110)]),
        {"task": "classification", "total_iterations": 500},
    ),  # fmt: skip
}


def _task(bundle: str) -> str:
    return bundle.split("_")[0]


def _embedded_plan(bundle: str, root: Path) -> dict[str, Any]:
    """The plan of ``bundle``'s embedded data set (its ``default_data``, written to ``root``), on CPU, without what
    names the machine or the time."""
    config = json.loads((BUNDLES / bundle / "configs" / "train.json").read_text())
    datalist = ensure_default_data(str(root / "data"), str(root), config["default_data"])
    plan = make_plan(datalist, task=_task(bundle), spatial_dims=config["spatial_dims"], base_dir=str(root / "data"))
    plan["fingerprint"]["per_case"].pop("image")  # paths
    return {k: plan[k] for k in ("task", "spatial_dims", "device", "budget", "settings", "reasons", "fingerprint")}


def _synthetic_plans(name: str) -> dict[str, Any]:
    fingerprint, options = SYNTHETIC[name]
    plans = {}
    for device in DEVICES:
        settings, reasons = make_settings(fingerprint, device=device, **options)
        plans[device] = {"settings": settings, "reasons": reasons}
    return plans


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _bundles() -> list[str]:
    return sorted(p.name for p in BUNDLES.iterdir() if (p / "configs" / "train.json").is_file())


@pytest.mark.parametrize("bundle", _bundles())
def test_the_embedded_data_sets_are_planned_as_before(bundle, tmp_path):
    plan = _embedded_plan(bundle, tmp_path)
    expected = json.loads(EXPECTED.read_text())["embedded"][bundle]
    for key in plan:  # one key at a time, in order: a difference names the key
        assert json.dumps(_json(plan[key])) == json.dumps(expected[key]), key
    cuda, _ = make_settings(plan["fingerprint"] | {"per_case": {}}, task=_task(bundle), device="cuda")
    assert _json(cuda) == expected["cuda_settings_without_per_case"]


@pytest.mark.parametrize("name", sorted(SYNTHETIC))
def test_synthetic_fingerprints_are_planned_as_before(name):
    expected = json.loads(EXPECTED.read_text())["synthetic"][name]
    assert json.dumps(_json(_synthetic_plans(name))) == json.dumps(expected)  # the keys in order too


def _record(root: Path) -> None:
    """Write :data:`EXPECTED` from the current planner."""
    embedded = {}
    for bundle in _bundles():
        plan = _embedded_plan(bundle, root / bundle)
        cuda, _ = make_settings(plan["fingerprint"] | {"per_case": {}}, task=_task(bundle), device="cuda")
        embedded[bundle] = {**plan, "cuda_settings_without_per_case": cuda}
    record = {"embedded": embedded, "synthetic": {name: _synthetic_plans(name) for name in sorted(SYNTHETIC)}}
    EXPECTED.write_text(json.dumps(_json(record), indent=1) + "\n")


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        _record(Path(tmp))
