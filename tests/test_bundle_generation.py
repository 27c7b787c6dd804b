"""The generated bundle configs (medkd.bundle_generation) are what their sources give, read like them, and merge as
MONAI merges the files they come from."""

import json
import shutil

import pytest
from bundle_utils import BUNDLES, REPO
from monai.bundle import ConfigParser

from medkd.__main__ import main
from medkd.bundle_generation import (
    SOURCE,
    _layout,
    format_config,
    generated_configs,
    plan_used,
    stale_configs,
    write_configs,
)
from medkd.bundles import GENERATED_FROM, train_digest
from medkd.errors import ConfigError

NAMES = ("segmentation_2d", "segmentation_3d", "classification_2d", "classification_3d")
GENERATED = ("segmentation_3d", "classification_2d", "classification_3d")  # train.json generated too


def test_regenerating_changes_nothing():
    assert stale_configs() == [], "run: python -m medkd bundles --generate"
    assert main(["bundles"]) == 0


@pytest.mark.parametrize("path", sorted(BUNDLES.glob("*/configs/*.json")), ids=lambda p: str(p.relative_to(BUNDLES)))
def test_a_config_written_again_keeps_its_text(path):
    text = path.read_text(encoding="utf-8")
    assert format_config(json.loads(text), _layout(text)) == text


def test_a_generated_file_edited_by_hand_is_named(tmp_path):
    bundles = shutil.copytree(BUNDLES, tmp_path / "bundles", ignore=shutil.ignore_patterns("data", "models", "eval"))
    edited = bundles / "segmentation_3d" / "configs" / "evaluate.json"
    edited.write_text(edited.read_text(encoding="utf-8").replace('"overlays": true', '"overlays": false'))
    assert stale_configs(bundles) == [edited]
    with pytest.raises(ConfigError, match="segmentation_3d/configs/evaluate.json: not what the sources give"):
        main(["bundles", "--bundles", str(bundles)])
    assert write_configs(bundles) == [edited]
    assert '"overlays": true' in edited.read_text(encoding="utf-8") and stale_configs(bundles) == []


def test_a_changed_source_reaches_every_bundle_generated_from_it(tmp_path):
    bundles = shutil.copytree(BUNDLES, tmp_path / "bundles", ignore=shutil.ignore_patterns("data", "models", "eval"))
    source = bundles / "segmentation_2d" / "configs" / "train_teacher.json"
    source.write_text(source.read_text(encoding="utf-8").replace("last_teacher.pt", "last_t.pt"))
    changed = {p.relative_to(bundles).as_posix() for p in write_configs(bundles)}
    # classification_3d's teacher stage comes from classification_2d's, generated from segmentation_2d's
    assert changed == {f"{b}/configs/train_teacher.json" for b in ("segmentation_3d", "classification_2d",
                                                                     "classification_3d")}  # fmt: skip


def test_a_2d_train_json_edited_without_regenerating_is_caught(tmp_path):
    bundles = shutil.copytree(BUNDLES, tmp_path / "bundles", ignore=shutil.ignore_patterns("data", "models", "eval"))
    train = bundles / "segmentation_2d" / "configs" / "train.json"
    train.write_text(train.read_text(encoding="utf-8").replace('"seed": 0,', '"seed": 1,'))
    stale = {p.relative_to(bundles).as_posix() for p in stale_configs(bundles)}
    # a key shared by every bundle is written once: in segmentation_2d's train.json, the others' generated from it
    assert stale == {f"{b}/configs/{s}.json" for b in NAMES for s in ("train", "evaluate", "inference")} - {
        "segmentation_2d/configs/train.json"}  # fmt: skip
    with pytest.raises(ConfigError, match=r"segmentation_2d/configs/evaluate.json.* medkd bundles --generate$"):
        main(["bundles", "--bundles", str(bundles)])


def additions(bundle: str, stage: str, folder) -> list:
    """The files whose merge a complete stage file adds to ``train.json``: the bundle's ``source/<stage>.json`` (else
    its base's additions), then its overrides, written to ``folder``."""
    spec = json.loads((BUNDLES / bundle / SOURCE).read_text(encoding="utf-8"))
    own = BUNDLES / bundle / "source" / f"{stage}.json"
    first = [own] if own.is_file() else additions(spec["base"].removeprefix("../"), stage, folder)
    overrides = folder / f"{bundle}_{stage}.json"
    overrides.write_text(json.dumps(spec["stages"].get(stage, {})))
    return first + [overrides]


def without(config: dict, paths: list[str]) -> dict:
    """``config`` without the items at the ``#`` ``paths``."""
    for path in paths:
        *parents, key = path.split("#")
        parent = config
        for name in parents:
            parent = parent[name]
        del parent[key]
    return config


@pytest.mark.parametrize("bundle", GENERATED)
def test_a_generated_train_json_is_monai_s_merge_of_its_sources_less_the_removed_keys(bundle, tmp_path):
    """... with the ``plan_used`` of its ``default_plan``."""
    spec = json.loads((BUNDLES / bundle / SOURCE).read_text(encoding="utf-8"))
    overrides = tmp_path / "train.json"
    overrides.write_text(json.dumps(spec["stages"]["train"]))
    base = (BUNDLES / bundle / spec["base"]).resolve() / "configs" / "train.json"
    generated = json.loads(generated_configs()[BUNDLES.resolve() / bundle / "configs" / "train.json"])
    merged = ConfigParser.load_config_files([str(base), str(overrides)])
    expected = without(merged, spec.get("remove", {}).get("train", []))
    assert generated == {**expected, "plan_used": plan_used(expected)}
    assert not any("#" in key or key.startswith("+") for key in generated)  # merged, as MONAI merges


@pytest.mark.parametrize(
    "bundle, edit, message",
    [
        ("classification_2d", lambda s: s["remove"]["train"].append("fingerprint#pixdim"),
         '"remove" names fingerprint#pixdim, which the generated file does not hold'),
        ("classification_2d", lambda s: s["remove"].update(evaluation=["x"]),
         "\"remove\" names the stages \\['evaluation'\\], which \"stages\" lacks"),
        ("segmentation_2d", lambda s: s["stages"].update(train={}), "the stages \\['train'\\] are made from a base"),
    ],
)  # fmt: skip
def test_a_wrong_source_generate_json_is_named(bundle, edit, message, tmp_path):
    bundles = shutil.copytree(BUNDLES, tmp_path / "bundles", ignore=shutil.ignore_patterns("data", "models", "eval"))
    spec = bundles / bundle / SOURCE
    settings = json.loads(spec.read_text(encoding="utf-8"))
    edit(settings)
    spec.write_text(json.dumps(settings))
    with pytest.raises(ConfigError, match=f"{bundle}/source/generate.json: .*{message}"):
        generated_configs(bundles)


@pytest.mark.parametrize("stage", ["evaluate", "inference"])
@pytest.mark.parametrize("bundle", NAMES)
def test_a_complete_stage_file_is_monai_s_merge_of_train_json_and_the_stage_sources(bundle, stage, tmp_path):
    files = [BUNDLES / bundle / "configs" / "train.json", *additions(bundle, stage, tmp_path)]
    assert all(f.name != f"{stage}.json" or f.parent.name == "source" for f in files)  # no complete file merged in
    generated = json.loads(generated_configs()[BUNDLES.resolve() / bundle / "configs" / f"{stage}.json"])
    recorded = generated.pop(GENERATED_FROM)  # the train.json it holds, known again by its digest
    assert recorded == train_digest(json.loads(files[0].read_text(encoding="utf-8")))
    assert generated == ConfigParser.load_config_files([str(f) for f in files])


@pytest.mark.parametrize("bundle", NAMES)
def test_plan_used_lists_the_keys_of_default_plan(bundle):
    config = json.loads((BUNDLES / bundle / "configs" / "train.json").read_text(encoding="utf-8"))
    assert config["plan_used"] == plan_used(config), f"{bundle}'s plan_used must list each key of default_plan"
    assert plan_used(config).startswith("${'in_channels': @in_channels, ")


def test_a_key_taken_off_default_plan_leaves_plan_used_of_the_generated_bundle(tmp_path):
    bundles = shutil.copytree(BUNDLES, tmp_path / "bundles", ignore=shutil.ignore_patterns("data", "models", "eval"))
    spec = bundles / "segmentation_3d" / SOURCE
    settings = json.loads(spec.read_text(encoding="utf-8"))
    del settings["stages"]["train"]["default_plan"]["sw_batch_size"]
    spec.write_text(json.dumps(settings))
    train = json.loads(generated_configs(bundles)[bundles / "segmentation_3d" / "configs" / "train.json"])
    assert "'sw_overlap': @sw_overlap, 'strides'" in train["plan_used"] and "sw_batch_size" not in train["plan_used"]
    assert "'teacher_channels': @teacher_channels, 'student_channels': @student_channels}" in train["plan_used"]


def test_the_layout_follows_the_source_of_each_value():
    text = generated_configs()[BUNDLES.resolve() / "segmentation_3d" / "configs" / "evaluate.json"]
    assert '\n    "dataset": {"_target_": "Dataset", ' in text  # one line, as in the 2D evaluate.json
    assert '\n    "default_plan": {\n        "in_channels": 1,\n        "pixdim": [1.0, 1.0, 1.0],' in text  # 3D source
    assert str(REPO) not in text


def test_a_folder_without_generated_bundles_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"--bundles .*: no bundle folder there has a source/generate.json"):
        main(["bundles", "--bundles", str(tmp_path)])
