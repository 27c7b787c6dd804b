"""A bundle's config is checked as a whole before any work: keys of every file, values of the command line, classes
and list lengths; each mistake is one ConfigError naming the file or key and the fix."""

import json
import subprocess
import sys

import pytest
from bundle_utils import BUNDLES, STAGES
from monai.bundle import ConfigParser

from medkd.bundles import stage_config, stage_files
from medkd.config_checks import check_config_keys, check_lengths, check_targets, read_config_file
from medkd.errors import ConfigError, config_file_error, user_error
from medkd.validation import check_command_line

SEG2D = BUNDLES / "segmentation_2d"
MAIN = str(next(p for p in sys.modules["monai"].__path__)) + "/bundle/__main__.py"


def edited(tmp_path, bundle="segmentation_2d", edit=lambda c: None, name="train.json"):
    """A copy of the bundle's ``train.json`` with ``edit`` applied, as a user edits it."""
    config = json.loads((BUNDLES / bundle / "configs" / "train.json").read_text())
    edit(config)
    path = tmp_path / name
    path.write_text(json.dumps(config, indent=4))
    return path


@pytest.mark.parametrize("bundle", list(STAGES))
@pytest.mark.parametrize("stage", ["train", "train_teacher", "evaluate", "inference", "multi_gpu_train"])
def test_the_shipped_bundles_pass(bundle, stage):
    files = stage_files(BUNDLES / bundle, stage)
    check_config_keys(files)
    check_targets(ConfigParser.load_config_files([str(f) for f in files]))


def test_a_misspelt_key_in_an_edited_file_names_the_nearest_key(tmp_path):
    typo = edited(tmp_path, edit=lambda c: c.update(kd_wieght=0.5))
    with pytest.raises(ConfigError, match=r"train.json: unknown key\(s\) 'kd_wieght' \(did you mean 'kd_weight'\?\)"):
        check_config_keys([typo])
    mine = tmp_path / "mine.json"  # the user's own file after the 3D bundle's train.json
    mine.write_text(json.dumps({"samples_per_volum": 4}))
    with pytest.raises(ConfigError, match=r"mine.json: .*'samples_per_volum' \(did you mean 'samples_per_volume'"):
        check_config_keys([BUNDLES / "segmentation_3d/configs/train.json", mine])


def test_a_key_of_ones_own_that_is_referred_to_is_accepted(tmp_path):
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({"my_lr": 0.01, "learning_rate": "$@my_lr / 2"}))
    check_config_keys([SEG2D / "configs/train.json", mine])


def test_keys_of_an_args_file_and_values_of_the_command_line_are_checked(tmp_path):
    args = tmp_path / "args.json"
    args.write_text(json.dumps({"config_file": str(SEG2D / "configs/train.json"), "temprature": 2}))
    with pytest.raises(ConfigError, match=r"did you mean --temperature"):
        check_command_line([MAIN, "run", "--args_file", str(args)])
    run = [MAIN, "run", "--config_file", str(SEG2D / "configs/train.json")]
    for given, message in [
        (["--amp", "false"], r"--amp 'false' is not a boolean: write --amp True or --amp False"),
        (["--resume", "0"], r"--resume 0 is not a boolean"),
        (["--patch_size", "32"], r'--patch_size 32 must be a list, one value per item: write --patch_size "\[32, 32'),
        (["--learning_rate", "1e-3x"], r"--learning_rate '1e-3x' is not a number: give e.g. --learning_rate 0.002"),
        (["--max_epochs", "0"], r"--max_epochs 0 must be a whole number of at least 1"),
    ]:
        with pytest.raises(ConfigError, match=message):
            check_command_line([*run, *given])
    check_command_line([*run, "--amp", "True", "--max_epochs", "2", "--patch_size", "[32,32]", "--seed", "$1+1"])


def test_a_deleted_key_is_named_with_the_file_that_needs_it(tmp_path):
    for key in ("loss", "pixdim"):
        path = edited(tmp_path, edit=lambda c, key=key: c.pop(key))
        with pytest.raises(ConfigError, match=rf"{path}: the key '{key}' is missing: .* Put it back in {path}"):
            check_config_keys([path])


def test_an_unknown_class_names_the_key_and_the_nearest_class():
    unett = r"teacher_def#_target_ 'UNett' names nothing importable: did you mean 'UNet'\?"
    with pytest.raises(ConfigError, match=unett):
        check_targets({"teacher_def": {"_target_": "UNett"}})
    with pytest.raises(ConfigError, match="not a class MONAI or torch knows"):
        check_targets({"loss": {"_target_": "torch.nn.NoSuchLossAtAll"}})


def test_a_json_syntax_error_names_the_file(tmp_path):
    broken = tmp_path / "my_routes.json"
    broken.write_text('{\n    "routes_preset": "kd"\n    "kd_weight": 0.5\n}')
    message = rf"{broken}: invalid JSON at line 3, column 5: Expecting ',' delimiter"
    with pytest.raises(ConfigError, match=message):
        read_config_file(broken)
    with pytest.raises(json.JSONDecodeError) as raised:  # as MONAI reads it (python -m medkd compare)
        ConfigParser().read_config([str(SEG2D / "configs/train.json"), str(broken)])
    assert str(config_file_error(raised.value, raised.tb)).startswith(f"{broken}: invalid JSON at line 3")


def test_list_lengths_that_must_agree_are_checked():
    check_lengths(2, [32, 32], [0.5, 0.5], [2, 2], {"teacher_channels": [8, 16, 32]})
    for args, message in [
        ((2, [32, 32, 32]), r"patch_size \[32, 32, 32\] must be a list of 2 values, one per spatial axis"),
        ((2, 32), "patch_size 32 must be a list of 2 values"),
        ((3, [32] * 3, [1.0, 1.0]), r"pixdim \[1.0, 1.0\] must be a list of 3 values"),
        ((2, [32, 32], 1.0, [2, 2], {"student_channels": [4, 8]}), r"student_channels \[4, 8\] must be a list of 3"),
    ]:
        with pytest.raises(ConfigError, match=message):
            check_lengths(*args)


def test_the_bundle_checks_channels_against_strides_before_building_networks():
    settings = {"strides": [2, 2], "teacher_channels": [8, 16, 32], "patch_size": [32, 32], "pixdim": [1.0, 1.0]}
    good = stage_config(SEG2D, "train", settings)
    good.get_parsed_content("check_lengths")
    bad = stage_config(SEG2D, "train", {**settings, "student_channels": [4, 8, 16, 32]})
    with pytest.raises(Exception) as raised:
        bad.get_parsed_content("check_lengths")
    assert "student_channels [4, 8, 16, 32] must be a list of 3 values" in str(user_error(raised.value))
    initialize = good["initialize"]
    assert initialize.index("$@check_lengths") < initialize.index("$@show_plan")  # before the networks are built


def test_a_typo_in_an_edited_train_json_stops_the_run_with_one_line(tmp_path):
    typo = edited(tmp_path, edit=lambda c: c.update(kd_wieght=0.5))
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(typo), "--bundle_root", str(tmp_path),
               "--meta_file", str(SEG2D / "configs/metadata.json")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert errors[0].startswith(f"ERROR: {typo}: unknown key(s) 'kd_wieght' (did you mean 'kd_weight'?)")
