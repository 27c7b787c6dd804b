"""The step-cost benchmark runs on the bundles' own settings (one quick step per variant)."""

import importlib.util
import json
import math
import sys

from bundle_utils import REPO


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_step_cost_measures_every_variant_with_the_bundle_networks(tmp_path):
    step_cost = _load("step_cost")
    out = tmp_path / "step_cost.json"
    assert (
        step_cost.main(["--setting", "2d", "--repeats", "2", "--warmup", "0", "--threads", "1", "--json", str(out)])
        == 0
    )
    (result,) = json.loads(out.read_text())["results"]
    train = json.loads((REPO / "bundles" / "segmentation_2d" / "configs" / "train.json").read_text())
    assert result["teacher_channels"] == train["teacher_def"]["channels"]
    assert result["student_channels"] == train["student_def"]["channels"]
    assert result["size"] == train["patch_size"] and result["batch_size"] == train["batch_size"]
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"a", "b", "b_plain", "b_dict", "c", "a_meta"}
    assert rows["a"]["ratio_to_a"] == 1.0
    assert all(r["median_ms"] > 0 and math.isfinite(r["ratio_to_a"]) and r["steps"] == 2 for r in rows.values())
