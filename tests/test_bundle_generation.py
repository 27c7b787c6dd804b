"""The generated bundle configs (medkd.bundle_generation) are what their sources give, read like them, and merge as
MONAI merges the files they come from."""

import json
import shutil

import pytest
from bundle_utils import BUNDLES, REPO
from monai.bundle import ConfigParser

from medkd.__main__ import main
from medkd.bundle_generation import SOURCE, _layout, format_config, generated_configs, stale_configs, write_configs
from medkd.errors import ConfigError

GENERATED = ("segmentation_3d", "classification_3d")  # every stage generated; classification_2d only borrows two


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


@pytest.mark.parametrize("stage", ["train", "evaluate", "inference"])
@pytest.mark.parametrize("bundle", GENERATED)
def test_a_generated_stage_is_monai_s_merge_of_its_sources(bundle, stage, tmp_path):
    spec = json.loads((BUNDLES / bundle / SOURCE).read_text(encoding="utf-8"))
    base = (BUNDLES / bundle / spec["base"]).resolve() / "configs"
    overrides = [tmp_path / "train.json", tmp_path / f"{stage}_own.json"]
    overrides[0].write_text(json.dumps(spec["stages"]["train"]))
    overrides[1].write_text(json.dumps(spec["stages"].get(stage, {})))
    files = [base / "train.json", overrides[0]] + ([base / f"{stage}.json", overrides[1]] if stage != "train" else [])
    generated = json.loads(generated_configs()[BUNDLES.resolve() / bundle / "configs" / f"{stage}.json"])
    assert generated == ConfigParser.load_config_files([str(f) for f in files])


def test_the_layout_follows_the_source_of_each_value():
    text = generated_configs()[BUNDLES.resolve() / "segmentation_3d" / "configs" / "evaluate.json"]
    assert '\n    "dataset": {"_target_": "Dataset", ' in text  # one line, as in the 2D evaluate.json
    assert '\n    "default_plan": {\n        "in_channels": 1,\n        "pixdim": [1.0, 1.0, 1.0],' in text  # 3D source
    assert str(REPO) not in text


def test_a_folder_without_generated_bundles_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"--bundles .*: no bundle folder there has a source/generate.json"):
        main(["bundles", "--bundles", str(tmp_path)])
