"""The documented ``python -m monai.bundle run`` commands are those medkd.bundles generates, and they run."""

import ast
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
from bundle_utils import BUNDLES, REPO

from medkd.bundles import STAGES, check_config_files, run_command, runs_alone, stage_files
from medkd.errors import ConfigError

NAMES = ("segmentation_2d", "segmentation_3d", "classification_2d", "classification_3d")
# documents showing stage commands, by the bundle folder they are typed in
DOCS = {
    **{f"bundles/{name}/docs/README.md": name for name in NAMES},
    "README.md": "segmentation_2d",
    "docs/planning.md": "segmentation_2d",
}
COMMAND = re.compile(r"-m monai\.bundle run (.+)$", re.M)


def documented_arguments(doc: str) -> list[list[str]]:
    """The arguments after ``monai.bundle run`` of each command in ``doc`` (continued lines joined, comments left
    out)."""
    text = (REPO / doc).read_text(encoding="utf-8").replace("\\\n", " ")
    return [shlex.split(found, comments=True) for found in COMMAND.findall(text)]


def option(arguments: list[str], name: str) -> str | None:
    return arguments[arguments.index(name) + 1] if name in arguments else None


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("bundle", NAMES)
def test_each_bundle_readme_shows_the_command_of_every_stage(bundle, stage):
    assert run_command(BUNDLES / bundle, stage) in (BUNDLES / bundle / "docs" / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("doc", DOCS)
def test_every_documented_command_merges_the_files_of_a_stage(doc):
    bundle = BUNDLES / DOCS[doc]
    stages = {stage: [p.resolve() for p in stage_files(bundle, stage)] for stage in STAGES}
    commands = documented_arguments(doc)
    assert commands, f"{doc} shows no stage command"
    for arguments in commands:
        listed = option(arguments, "--config_file")
        files = [(bundle / f).resolve() for f in (ast.literal_eval(listed) if listed.startswith("[") else [listed])]
        assert all(f.is_file() for f in files), f"{doc}: {listed} names a missing file"
        alone = len(files) == 1 and runs_alone(files[0])  # a generated evaluate.json or inference.json
        assert files in stages.values() or alone, f"{doc}: {listed} is no stage's list: {stages}"


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("bundle", NAMES)
def test_the_config_files_of_every_stage_pass_the_check(bundle, stage, tmp_path):
    check_config_files([*stage_files(BUNDLES / bundle, stage), tmp_path / "tiny.json"], start=REPO)  # own files too


@pytest.mark.parametrize(
    "folder, listed, command",
    [
        (  # a stage file that adds to train.json, alone
            "bundles/segmentation_3d",
            ["configs/train_teacher.json"],
            "--config_file \"['configs/train.json','configs/train_teacher.json']\" --bundle_root out",
        ),
        (  # the files in reverse order
            "bundles/segmentation_3d",
            ["configs/evaluate.json", "configs/train.json"],
            "--config_file \"['configs/train.json','configs/evaluate.json']\" --bundle_root out",
        ),
        (  # a stage file alone (was NameError: name 'medkd' is not defined)
            "bundles/segmentation_2d",
            ["configs/train_teacher.json"],
            "--config_file \"['configs/train.json','configs/train_teacher.json']\" --bundle_root out",
        ),
        (  # train.json after the complete inference.json, which runs alone
            "bundles/segmentation_2d",
            ["configs/inference.json", "configs/train.json"],
            "--config_file configs/inference.json --bundle_root out",
        ),
        (  # the 3D train.json with a 2D stage file (the former overlay's habit), typed from the repository
            ".",
            ["bundles/classification_3d/configs/train.json", "bundles/classification_2d/configs/evaluate.json"],
            "--config_file \"['bundles/classification_3d/configs/train.json','bundles/classification_3d/configs/"
            "evaluate.json']\" --bundle_root out",
        ),
    ],
)
def test_wrong_config_files_are_told_the_command_to_run_from_where_the_user_is(folder, listed, command):
    start = REPO / folder
    with pytest.raises(ConfigError) as err:
        check_config_files(listed, start=start, options=["--bundle_root", "out"])
    assert str(err.value).endswith(f"Run: python -m monai.bundle run {command}")
    listed = option(shlex.split(command), "--config_file")
    files = ast.literal_eval(listed) if listed.startswith("[") else [listed]
    assert all((start / f).is_file() for f in files)  # relative to where the user is


@pytest.mark.parametrize("stage", ["evaluate", "inference"])
@pytest.mark.parametrize("bundle", NAMES)
def test_every_evaluate_and_inference_file_runs_alone_or_after_train_json(bundle, stage):
    for listed in ([f"configs/{stage}.json"], ["configs/train.json", f"configs/{stage}.json"]):
        check_config_files(listed, start=BUNDLES / bundle)
    assert runs_alone(BUNDLES / bundle / "configs" / f"{stage}.json")
    assert not runs_alone(BUNDLES / bundle / "configs" / "train_teacher.json")  # adds to train.json


@pytest.mark.parametrize("bundle", NAMES)
def test_inference_runs_from_inference_json_alone_as_in_the_model_zoo(bundle):
    assert stage_files(BUNDLES / bundle, "inference") == [BUNDLES / bundle / "configs" / "inference.json"]
    assert run_command(BUNDLES / bundle, "inference").endswith("run --config_file configs/inference.json")


@pytest.mark.parametrize(
    "listed, stage",
    [
        ("configs/multi_gpu_train.json", "multi_gpu_train"),  # was: KeyError: 'query key: train', as the file was read
        ("configs/train_teacher.json", "train_teacher"),
    ],
)
def test_a_stage_file_without_train_json_ends_in_one_message(listed, stage, tmp_path):
    """``python -m monai.bundle run --config_file ...`` typed in a 3D bundle with a stage file but no ``train.json``."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", listed, "--bundle_root", str(tmp_path)],
        cwd=BUNDLES / "segmentation_3d",
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.splitlines()[-1]
    assert last.startswith(f"ERROR: --config_file {listed}") and f"the {stage} stage of the bundle " in last
    assert last.endswith(f"Run: {run_command(BUNDLES / 'segmentation_3d', stage)} --bundle_root {tmp_path}")
    assert not list(tmp_path.iterdir())  # nothing made


@pytest.mark.parametrize("listed", [["configs/inference.json"], ["configs/train.json", "configs/evaluate.json"]])
def test_a_generated_stage_file_older_than_an_edited_train_json_stops(listed, tmp_path):
    # the complete files hold a copy of train.json: after an edit of train.json, that copy would undo the edit
    folder = tmp_path / "segmentation_2d"
    shutil.copytree(BUNDLES / "segmentation_2d" / "configs", folder / "configs")
    check_config_files(listed, start=folder)  # as shipped
    train = folder / "configs" / "train.json"
    train.write_text(train.read_text(encoding="utf-8").replace('"kd_weight": 1.0', '"kd_weight": 0.5', 1))
    stage = folder / listed[-1]
    with pytest.raises(ConfigError, match=rf"{stage} holds a copy of {train} as it was before it was edited.*"
                       rf"python -m medkd bundles --generate --bundles {tmp_path} "):  # fmt: skip
        check_config_files(listed, start=folder)
    train.write_text(train.read_text(encoding="utf-8").replace('"kd_weight": 0.5', '"kd_weight": 1.0', 1))
    check_config_files(listed, start=folder)  # undone: the copy is current again
