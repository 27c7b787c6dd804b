"""Every bundle names the same concept with the same key (old names are rejected with the new one), and its
expressions hold no Python logic of their own."""

import json
import re
from pathlib import Path

import pytest
from bundle_utils import BUNDLES, STAGES

from medkd import bundles
from medkd.bundles import run_folders, stage_config
from medkd.errors import ConfigError
from medkd.validation import RENAMED, check_overrides

SHARED, STAGE_KEYS, OWN = bundles.SHARED_KEYS, bundles.STAGE_KEYS, bundles.OWN_KEYS


def top_level_keys(bundle: str, stage: str) -> set[str]:
    return set(stage_config(BUNDLES / bundle, stage).get()) - {"_meta_"}


@pytest.mark.parametrize("stage", list(STAGE_KEYS))
@pytest.mark.parametrize("bundle", list(OWN))
def test_bundles_share_the_names_of_shared_concepts(bundle, stage):
    keys = top_level_keys(bundle, stage)
    assert not (SHARED | STAGE_KEYS[stage]) - keys, f"{bundle} lacks shared keys"
    assert keys - SHARED - STAGE_KEYS[stage] == OWN[bundle], f"{bundle} has keys of its own not listed in OWN"


def test_renamed_keys_are_not_used_by_any_bundle():
    for bundle, stages in STAGES.items():
        for stage in stages:
            assert not set(RENAMED) & top_level_keys(bundle, stage), (bundle, stage)


@pytest.mark.parametrize("old, new", [("image_size", "patch_size"), ("data_keys", "load_keys")])
@pytest.mark.parametrize("bundle", list(OWN))
def test_old_key_names_the_new_one(bundle, old, new):
    with pytest.raises(ConfigError, match=rf"--{old} \(renamed --{new}\)"):
        check_overrides(STAGES[bundle]["train"], [old])


def expressions(node):
    """Every ``$`` expression in a config."""
    if isinstance(node, dict):
        return [e for v in node.values() for e in expressions(v)]
    if isinstance(node, list):
        return [e for v in node for e in expressions(v)]
    return [node] if isinstance(node, str) and node.startswith("$") else []


LOGIC = re.compile(r"\b(if|else|for|lambda|and|or|not)\b|\[[^\]]*:")  # conditionals, loops, lambdas, slices


@pytest.mark.parametrize("config", sorted(p for p in BUNDLES.glob("*/configs/*.json") if p.name != "metadata.json"))
def test_bundle_expressions_call_named_functions_instead_of_inline_logic(config):
    found = [e for e in expressions(json.loads(config.read_text(encoding="utf-8"))) if LOGIC.search(e)]
    assert not found, f"{config}: move into a named medkd function: {found}"


def test_the_keys_medkd_reads_are_shared_keys():
    keys = [bundles.CKPT_DIR, bundles.OUTPUT_DIR, bundles.LOG_DIR, bundles.DATASET_DIR, bundles.DATALISTS,
            bundles.MAKE_DEFAULT_DATA, bundles.TEACHER_CKPT, bundles.ROUTES_PRESET, bundles.SEED, bundles.MAX_EPOCHS,
            bundles.DEVICE, bundles.TEACHER_DEF, bundles.STUDENTS, bundles.IN_CHANNELS, bundles.PATCH_SIZE,
            bundles.INFERER, bundles.INPUT_SETTINGS]  # fmt: skip
    evaluate = [bundles.NETWORKS, bundles.ENSEMBLE_MEMBERS, bundles.EVAL_DATASET]
    assert set(keys) <= SHARED and set(evaluate) <= STAGE_KEYS["evaluate"]


@pytest.mark.parametrize("bundle", list(OWN))
def test_bundles_write_the_files_medkd_reads(bundle, tmp_path):
    folders = run_folders(tmp_path)
    train = stage_config(BUNDLES / bundle, "train", {"bundle_root": str(tmp_path)})
    assert {key: train.get_parsed_content(key) for key in folders} == folders
    checkpoints, output = Path(folders[bundles.CKPT_DIR]), Path(folders[bundles.OUTPUT_DIR])
    assert train.get_parsed_content(bundles.TEACHER_CKPT) == str(checkpoints / bundles.TEACHER_CHECKPOINT)
    assert train.get_parsed_content("history_file") == str(output / bundles.STUDENTS_HISTORY)
    teacher = stage_config(BUNDLES / bundle, "train_teacher", {"bundle_root": str(tmp_path)})
    assert teacher.get_parsed_content("history_file") == str(output / bundles.TEACHER_HISTORY)
    assert train.get_parsed_content("settings_file") == str(checkpoints / bundles.STUDENTS_SETTINGS)
    assert teacher.get_parsed_content("settings_file") == str(checkpoints / bundles.TEACHER_SETTINGS)
