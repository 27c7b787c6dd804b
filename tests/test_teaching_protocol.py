"""The teaching protocol's bundle keys: mixed distillation batches (mix), teaching from an earlier teacher snapshot
(teacher_snapshots, teacher_epoch) and longer schedules in a comparison with the same steps for every preset."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from bundle_utils import BUNDLES, REPO, run_stage, stage_command, tiny_overlay

from medkd.bundles import TEACHER, stage_config
from medkd.errors import ConfigError, user_error
from medkd.runtime.files import load_checkpoint
from medkd.tools.compare import run_settings
from medkd.training.mixing import BatchMixer


@pytest.mark.parametrize(("bundle", "mix"), [("segmentation_2d", "cutmix"), ("classification_2d", "mixup")])
def test_distillation_mixes_and_is_taught_by_a_teacher_snapshot(bundle, mix, tmp_path):
    run_stage(bundle, "train_teacher", tmp_path, max_epochs=2, teacher_snapshots=[1])
    snapshot = tmp_path / "models" / "teacher_epoch1.pt"
    assert snapshot.is_file() and (tmp_path / "models" / "teacher.pt").is_file()
    record = load_checkpoint(snapshot)
    assert record["epoch"] == 1 and "inputs" in record["fingerprint"]
    workflow = run_stage(bundle, "train", tmp_path, mix=mix, mix_prob=1.0, teacher_epoch=1, routes_preset="kd")
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert isinstance(trainer.mixing, BatchMixer) and trainer.mixing.mode == mix
    weights = trainer.teacher.state_dict()
    assert all(torch.equal(weights[k].cpu(), v) for k, v in record[TEACHER].items())
    assert load_checkpoint(tmp_path / "models" / "last.pt")["fingerprint"]["mixing"]["mix"] == mix


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"mix": "mixin"}, "mix must be null (None on the command line), 'mixup' or 'cutmix', got 'mixin'."),
     ({"mix": "cutmix", "mix_prob": 2}, "mix_prob must be a number from 0 to 1"),
     ({"teacher_snapshots": [0, 10]}, "teacher_snapshots must be a list of epochs"),
     ({"teacher_epoch": "ten"}, "teacher_epoch must be null (None on the command line) or an epoch")],
)  # fmt: skip
def test_bad_protocol_values_stop_the_run_before_it_starts(overrides, message, tmp_path):
    with pytest.raises(RuntimeError) as err:
        run_stage("segmentation_2d", "train", tmp_path, **overrides)
    assert isinstance(user_error(err.value), ConfigError) and str(user_error(err.value)).startswith(message)
    assert not (tmp_path / "models" / "last.pt").exists()


def test_a_bad_mix_on_the_command_line_is_one_error_line(tmp_path):
    overlay = tiny_overlay("segmentation_2d", tmp_path / "tiny.json")
    cmd = stage_command("segmentation_2d", "train", tmp_path, overlay, mix="mixin")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run(cmd, capture_output=True, encoding="utf-8", env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "ERROR: mix must be null (None on the command line), 'mixup' or 'cutmix', got 'mixin'."
    )


def test_a_missing_teacher_snapshot_is_named(tmp_path):
    with pytest.raises(RuntimeError) as err:
        run_stage("segmentation_2d", "train", tmp_path, teacher_epoch=7)
    assert "teacher_epoch7.pt does not exist" in str(user_error(err.value))


@pytest.mark.parametrize("bundle", ["segmentation_2d", "classification_2d"])
def test_a_longer_comparison_gives_the_student_baseline_the_same_steps(bundle, tmp_path):
    common = {"max_epochs": 120, "iterations_per_epoch": 50, "teacher_epoch": 10}
    steps = {}
    for preset in ("student", "kd", "diversified"):
        settings = run_settings(tmp_path, preset, 0, common)
        parser = stage_config(BUNDLES / bundle, "train", settings)
        trainer = parser.get("train#trainer")
        steps[preset] = (parser.get_parsed_content("max_epochs"), parser.get_parsed_content("iterations_per_epoch"))
        assert trainer["max_epochs"] == "@max_epochs" and trainer["epoch_length"] == "@iterations_per_epoch"
        assert Path(settings["teacher_ckpt"]) == tmp_path / TEACHER / "models" / "teacher_epoch10.pt"
    assert set(steps.values()) == {(120, 50)}
    assert run_settings(tmp_path, "student", 0, common, max_epochs=30)["max_epochs"] == 30
