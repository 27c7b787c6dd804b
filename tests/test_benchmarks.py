"""The benchmark scripts run on the bundles' own settings (a few quick steps)."""

import importlib.util
import json
import math
import platform
import re
import sys

import pytest
import torch
from bundle_utils import BUNDLES, REPO, TINY

from medkd.bundles import stage_config
from medkd.planning import scale_channels


def _load(name: str):
    sys.path.insert(0, str(REPO / "benchmarks"))  # as when run as a script: its sibling modules import
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
    report = json.loads(out.read_text())
    (result,) = report["results"]
    assert report["meta"]["freed_memory_kept"] is (platform.libc_ver()[0] == "glibc")  # as the bundles run
    train = json.loads((REPO / "bundles" / "segmentation_2d" / "configs" / "train.json").read_text())
    defaults = train["default_plan"]  # the embedded data's settings (no plan is made for it)
    assert result["teacher_channels"] == defaults["teacher_channels"]
    assert result["student_channels"] == scale_channels(defaults["teacher_channels"], train["compression"])
    assert result["size"] == defaults["patch_size"] and result["batch_size"] == defaults["batch_size"]
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"a", "a_routes", "b", "b_plain", "b_dict", "c", "a_meta", "b_cl"}
    assert rows["a"]["ratio_to_a"] == 1.0 and rows["a_routes"]["ratio_to_a_routes"] == 1.0
    assert all(r["median_ms"] > 0 and math.isfinite(r["ratio_to_a"]) and r["steps"] == 2 for r in rows.values())


def test_batched_students_benchmark_times_the_same_work_both_ways(capsys):
    batched_students = _load("batched_students")
    first = {name: step() for name, step in batched_students.steps("2d", torch.device("cpu")).items()}
    assert first["vmap"] == pytest.approx(first["seq"], rel=1e-5)  # the same students, losses and batch
    assert batched_students.main(["--setting", "2d", "--repeats", "1", "--warmup", "0"]) == 0
    assert re.search(r"\| 2d \| [\d.]+ \| [\d.]+ \| [\d.]+ \|", capsys.readouterr().out)


def test_teacher_cache_benchmark_reports_identical_students_and_skipped_forwards(tmp_path):
    teacher_cache = _load("teacher_cache")
    out = tmp_path / "teacher_cache.json"
    argv = ["--epochs", "3", "--cases", "8", "--size", "48", "--batch-size", "4", "--threads", "1", "--json", str(out)]
    assert teacher_cache.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["allclose"] and result["max_weight_diff"] < 1e-5
    assert result["plain"]["teacher_forwards"] == [2, 2, 2]
    assert result["cached"]["teacher_forwards"] == [2, 1, 0]  # filled, verified once, then served from the cache


def test_pixel_accuracy_pools_the_test_pixels_of_each_network(tmp_path):
    from medkd.data.synthetic import ensure_segmentation_data

    ensure_segmentation_data(tmp_path / "data", spatial_dims=2, size=48, counts=(4, 2, 2))
    constant = {}  # networks that predict one class everywhere: class 0 (teacher) and class 2 (sp)
    for name, cls in (("teacher", 0), ("sp", 2)):
        net = torch.nn.Conv2d(1, 3, 1)
        torch.nn.init.zeros_(net.weight)
        net.bias.data = torch.nn.functional.one_hot(torch.tensor(cls), 3).float()
        (tmp_path / "models").mkdir(exist_ok=True)
        torch.save(net.state_dict(), tmp_path / "models" / f"{name}.pt")
        constant[name] = cls
    conv = {"_target_": "torch.nn.Conv2d", "in_channels": 1, "out_channels": 3, "kernel_size": 1}
    overrides = {**TINY["segmentation_2d"], "bundle_root": str(tmp_path), "teacher_def": conv, "student_def": conv}
    found = _load("pixel_accuracy").pixel_accuracy(BUNDLES / "segmentation_2d", tmp_path, ["teacher", "sp"], overrides)
    parser = stage_config(BUNDLES / "segmentation_2d", "evaluate", overrides)
    labels = torch.cat([batch["label"].flatten() for batch in parser.get_parsed_content("dataloader")])
    expected = {name: float((labels == cls).float().mean()) for name, cls in constant.items()}
    assert found == pytest.approx(expected) and 0 < expected["sp"] < expected["teacher"] < 1


def test_imbalanced_subset_thins_the_chosen_classes_of_the_training_and_validation_lists_only():
    subset = _load("imbalanced_subset")
    lists = {key: [{"image": f"{key}{i}.png", "label": i % 2} for i in range(400)] for key in ("training", "test")}
    out = subset.imbalanced({"labels": {"0": "a", "1": "b"}, **lists}, {1: 0.25})
    kept = [e["label"] for e in out["training"]]
    assert kept.count(0) == 200 and 30 <= kept.count(1) <= 70 and out["test"] == lists["test"]
    assert out["labels"] == {"0": "a", "1": "b"}
    assert subset.imbalanced(lists, {1: 0.25})["training"] == out["training"]  # seeded: the same images again


def test_hippocampus_subset_is_a_seeded_draw_split_by_case(tmp_path):
    subset = _load("hippocampus_subset")
    source = tmp_path / "Task04_Hippocampus"
    cases = [{"image": f"./imagesTr/hippocampus_{i:03d}.nii.gz", "label": f"./labelsTr/hippocampus_{i:03d}.nii.gz"}
             for i in range(12)]  # fmt: skip
    for case in cases:
        for path in case.values():
            (source / path).parent.mkdir(parents=True, exist_ok=True)
            (source / path).write_bytes(path.encode())
    (source / "dataset.json").write_text(json.dumps({"reference": "VUMC", "training": cases}))
    assert subset.main([str(source), str(tmp_path / "out"), "--counts", "4", "2", "2"]) == 0
    data = json.loads((tmp_path / "out" / "dataset.json").read_text())
    drawn = subset.draw(cases, (4, 2, 2))
    assert drawn == subset.draw(cases, (4, 2, 2)) != subset.draw(cases, (4, 2, 2), seed=1)
    names = [[e["image"].split("/")[-1] for e in data[k]] for k in ("training", "validation", "test")]
    assert [len(n) for n in names] == [4, 2, 2] and len(set(sum(names, []))) == 8
    assert names == [[e["image"].split("/")[-1] for e in drawn[k]] for k in ("training", "validation", "test")]
    for entry in data["test"]:  # copied unchanged, label beside image
        assert (tmp_path / "out" / entry["label"]).read_bytes() == f"./labelsTr/{entry['label'][7:]}".encode()
