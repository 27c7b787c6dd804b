"""Settings are checked before work starts, and every user error reaches the user as one message, exit status 1."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_utils import BUNDLES, stage_command, tiny_overlay
from monai.networks.nets import UNet
from PIL import Image

from medkd.errors import ConfigError, MedkdError, user_error
from medkd.knowledge.routes import Route, parse_routes, preset_routes
from medkd.runtime.devices import check_device
from medkd.validation import (
    bundle_hint,
    check_command_line,
    check_inputs,
    check_overrides,
    check_patch_size,
    check_writable,
    command_line_overrides,
    total_stride,
)

SEG2D = BUNDLES / "segmentation_2d" / "configs"


def test_unknown_override_names_the_nearest_key():
    with pytest.raises(ConfigError, match=r"--temprature \(did you mean --temperature\?\)"):
        check_overrides([SEG2D / "train.json"], ["temprature", "kd_weight"])
    with pytest.raises(
        ConfigError, match=r"--train#dataloader#batch_sise \(did you mean --train#dataloader#batch_size"
    ):
        check_overrides([SEG2D / "train.json"], ["train#dataloader#batch_sise"])
    check_overrides(
        [SEG2D / "train.json", SEG2D / "evaluate.json"], ["kd_weight", "train#dataloader#num_workers", "tracking"]
    )


def test_command_line_is_read_as_fire_reads_it():
    argv = ["run", "--config_file", "['a.json','b.json']", "--max-epochs", "3", "--amp=True", "--resume"]
    assert command_line_overrides(argv) == {
        "config_file": ["a.json", "b.json"],
        "max_epochs": 3,
        "amp": True,
        "resume": True,
    }


def test_command_line_check_applies_to_monai_bundle_run_only(tmp_path):
    main = str(next(p for p in sys.modules["monai"].__path__)) + "/bundle/__main__.py"
    typo = ["run", "--config_file", str(SEG2D / "train.json"), "--kd_wieght", "2"]
    with pytest.raises(ConfigError, match="did you mean --kd_weight"):
        check_command_line([main, *typo])
    check_command_line(["pytest", *typo])  # another program: its caller checks its own overrides
    args = tmp_path / "args.json"
    args.write_text(json.dumps({"config_file": str(SEG2D / "train.json"), "max_epoch": 2}))
    with pytest.raises(ConfigError, match="did you mean --max_epochs"):
        check_command_line([main, "run", "--args_file", str(args)])
    alone = ["run", "--config_file", str(SEG2D / "train.json"), "--datalist_file", "/data/mine/all.csv"]
    with pytest.raises(ConfigError, match=r"without --dataset_dir: .* Add --dataset_dir /data/mine \(the folder"):
        check_command_line([main, *alone])
    check_command_line([main, *alone, "--dataset_dir", "/data/mine"])


def test_a_gpu_that_torch_cannot_use_is_named_before_the_run(monkeypatch):
    main = str(next(p for p in sys.modules["monai"].__path__)) + "/bundle/__main__.py"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(ConfigError, match=r"^--device cuda: this torch \(.*\) is built without CUDA; install a CUDA "
                       "build of torch, or leave --device out to run on the CPU.$"):  # fmt: skip
        check_command_line([main, "run", "--config_file", str(SEG2D / "train.json"), "--device", "cuda"])
    check_device("cpu")
    check_device("$torch.device('cuda')")  # an expression: evaluated by the bundle
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    with pytest.raises(ConfigError, match="no GPU is visible"):
        check_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    check_device("cuda")
    with pytest.raises(ConfigError, match=r"there are 1 GPU\(s\), cuda:0..cuda:0; pick one"):
        check_device("cuda:1")
    with pytest.raises(ConfigError, match="'gpu' is not a device: use cpu, cuda or cuda:N"):
        check_device("gpu")


def test_a_folder_that_cannot_be_written_is_named_with_the_option_that_moves_it(tmp_path, monkeypatch):
    from medkd.bundles import stage_workflow
    from medkd.tools.compare import compare

    read_only = tmp_path / "read_only"
    read_only.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != read_only and access(path, mode))
    with pytest.raises(ConfigError) as err:
        check_writable({"output_dir": read_only / "eval"})
    assert str(err.value) == (
        f"{read_only}/eval (output_dir) cannot be written: {read_only} is read-only. Give --output_dir (or "
        "--bundle_root, the folder the bundle writes models/, eval/ and runs/ under) a folder you can write to."
    )
    check_writable({"output_dir": tmp_path / "new" / "eval"})  # a folder that can be made
    (tmp_path / "file").write_text("")
    workflow = stage_workflow(SEG2D.parent, "train", bundle_root=str(tmp_path), ckpt_dir=str(tmp_path / "file" / "m"))
    with pytest.raises(RuntimeError) as err:  # before any data is made or read
        workflow.initialize()
    assert str(user_error(err.value)).startswith(f"{tmp_path}/file/m (ckpt_dir) cannot be written: {tmp_path}/file is")
    assert not (tmp_path / "data").exists()
    with pytest.raises(ConfigError, match=r"\(output\) cannot be written: .* is read-only. Give --output a folder"):
        compare(SEG2D.parent, output=read_only / "results")


def test_the_bundle_for_other_images_is_named_by_the_command_to_type_where_the_user_is():
    # was "use bundles/segmentation_3d"
    assert bundle_hint(3, "segmentation", start=BUNDLES / "segmentation_2d") == (
        "run python -m monai.bundle run --config_file ../segmentation_3d/configs/train.json"
    )
    assert bundle_hint(2, start=BUNDLES.parent) == (
        "run python -m monai.bundle run --config_file bundles/segmentation_2d/configs/train.json or python -m "
        "monai.bundle run --config_file bundles/classification_2d/configs/train.json"
    )


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: preset_routes("kd", kd_weight=-1),
            r"kd_weight \(the weight of teacher → student prediction terms\) must",
        ),
        (lambda: preset_routes("kd", kd_weight="abc"), "got 'abc'"),
        (lambda: preset_routes("kd", temperature=0), "temperature must be a finite number > 0"),
        (lambda: preset_routes("distill"), "unknown routes preset 'distill'"),
        (lambda: Route("teacher", "sp", "logits"), "kind 'logits'"),
        (lambda: Route("teacher", "sp", "feature", mode="l1"), "mode 'l1'"),
        (lambda: Route("teacher", "sp", "prediction", weight=float("nan")), "weight of route sp/prediction_from"),
        (
            lambda: parse_routes(
                [{"source": "teacher", "target": "sp", "kind": "prediction", "mode": "attention"}], []
            ),
            r"\['mode'\] do\(es\) nothing on a prediction route",
        ),
        (
            lambda: parse_routes([{"source": "teacher", "target": "sp", "kind": "feature", "temperature": 2}], []),
            r"\['temperature'\] do\(es\) nothing on a feature route",
        ),
        (lambda: parse_routes([{"source": "teacher", "kind": "feature"}], []), "needs 'source', 'target' and 'kind'"),
    ],
)
def test_bad_routes_and_weights_are_config_errors(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_patch_size_must_be_a_multiple_of_the_total_stride():
    unet = UNet(2, 1, 2, channels=(4, 8, 16, 32), strides=(2, 2, 2))
    assert total_stride(unet) == [8, 8]
    check_patch_size({"teacher": unet}, [96, 64])
    with pytest.raises(ConfigError, match=r"patch_size \[90, 96\] is not a multiple of \[8, 8\].*teacher.*\[88, 96\]"):
        check_patch_size({"teacher": unet}, [90, 96])
    anisotropic = UNet(3, 1, 2, channels=(4, 8, 16), strides=((2, 2, 1), (2, 2, 2)))
    assert total_stride(anisotropic) == [4, 4, 2]
    check_patch_size({"sp": anisotropic}, [32, 32, 6])
    assert total_stride(torch.nn.Conv2d(1, 1, 3)) is None  # no recorded strides: tried on the meta device


def test_a_patch_too_small_for_a_classifier_is_named_with_a_size_that_works():
    from monai.networks.nets import DenseNet121

    teacher = DenseNet121(spatial_dims=3, in_channels=2, out_channels=2)
    weights = {k: v.clone() for k, v in teacher.state_dict().items()}
    check_patch_size({"teacher": teacher}, [32, 32, 32])
    for size, works in (([16, 16, 16], [32, 32, 32]), ([24, 40, 32], [32, 64, 32])):
        with pytest.raises(ConfigError) as error:
            check_patch_size({"teacher": teacher}, size)
        assert f"patch_size {size} is too small for the teacher network (DenseNet121)" in str(error.value)
        assert f'Use e.g. --patch_size "{works}"' in str(error.value)
    assert all(torch.equal(weights[k], v) for k, v in teacher.state_dict().items())  # tried on meta tensors
    assert next(teacher.parameters()).device == torch.device("cpu")
    check_patch_size({"pool": torch.nn.AdaptiveAvgPool2d(1)}, [1, 1])  # no convolution: nothing to try


def test_channels_and_3d_inputs_are_named(tmp_path):
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "rgb.png")
    for channels in (1, 3):  # a picture is converted to either as it loads
        check_inputs({"training": [{"image": str(tmp_path / "rgb.png")}]}, in_channels=channels, spatial_dims=2)
    for name in ("t1", "t2"):  # the channels of a volume are modalities: not converted
        nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), tmp_path / f"{name}.nii.gz")
    case = [str(tmp_path / "t1.nii.gz"), str(tmp_path / "t2.nii.gz")]
    with pytest.raises(ConfigError, match=r"t2.nii.gz'\] \(first image of the training list\) has 2 channels but"):
        check_inputs({"training": [{"image": case}]}, in_channels=1, spatial_dims=2)
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), tmp_path / "ct.nii.gz")
    with pytest.raises(ConfigError, match=r"ct.nii.gz .* is 3D but this bundle has spatial_dims=2.*segmentation_3d"):
        check_inputs({"test": [{"image": str(tmp_path / "ct.nii.gz")}]}, in_channels=1, spatial_dims=2)


def test_user_error_is_found_through_monai_wrappers():
    try:
        try:
            raise ConfigError("bad key")
        except ConfigError as e:
            raise RuntimeError("Failed to evaluate ConfigExpression") from e
    except RuntimeError as wrapped:
        assert isinstance(user_error(wrapped), MedkdError)
    assert user_error(RuntimeError("other")) is None


def _run(cmd, cwd):
    return subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace", cwd=cwd, timeout=300)


def _assert_one_message(proc, *fragments):
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("ERROR: ")]
    assert len(error) == 1, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in error[0], error[0]


@pytest.mark.parametrize(
    "stage, overrides, fragments",
    [
        ("train", {"temprature": 2}, ["--temprature (did you mean --temperature?)"]),
        ("train", {"kd_weight": "abc"}, ["--kd_weight 'abc' is not a number: give e.g. --kd_weight 1.0"]),
        ("train", {"patch_size": [30, 30]}, ["patch_size [30, 30] is not a multiple of [16, 16]"]),
    ],
)
def test_bundle_mistakes_end_in_one_message(stage, overrides, fragments, tmp_path):
    overlay = tiny_overlay("segmentation_2d", tmp_path / "tiny.json")
    _assert_one_message(
        _run(stage_command("segmentation_2d", stage, tmp_path, overlay, **overrides), tmp_path), *fragments
    )


def test_a_classification_patch_too_small_ends_in_one_message(tmp_path):
    overlay = tiny_overlay("classification_3d", tmp_path / "tiny.json", patch_size=[16, 16, 16])
    proc = _run(stage_command("classification_3d", "train_teacher", tmp_path, overlay), tmp_path)
    _assert_one_message(proc, "patch_size [16, 16, 16] is too small for the teacher network (DenseNet121)")


def test_wrong_dataset_dir_ends_in_one_message(tmp_path):
    missing = tmp_path / "no_such_folder"
    proc = _run(stage_command("segmentation_2d", "train_teacher", tmp_path, dataset_dir=str(missing)), tmp_path)
    _assert_one_message(proc, f"{missing}/dataset.json does not exist", "--dataset_dir")
    assert not missing.exists()


def test_missing_or_truncated_checkpoint_and_bad_test_list_end_in_one_message(tmp_path):
    overlay = tiny_overlay("segmentation_2d", tmp_path / "tiny.json", max_epochs=1)
    assert _run(stage_command("segmentation_2d", "train_teacher", tmp_path, overlay), tmp_path).returncode == 0
    # students not trained yet
    _assert_one_message(_run(stage_command("segmentation_2d", "evaluate", tmp_path, overlay), tmp_path),
                        "sp.pt does not exist", "train that network first")  # fmt: skip
    # a truncated teacher checkpoint, read by the distillation stage
    teacher = tmp_path / "models" / "teacher.pt"
    good = teacher.read_bytes()
    teacher.write_bytes(good[: len(good) // 2])
    _assert_one_message(_run(stage_command("segmentation_2d", "train", tmp_path, overlay), tmp_path),
                        "teacher.pt cannot be read", "truncated")  # fmt: skip
    teacher.write_bytes(good)
    # a test list naming a missing file is reported before evaluation starts
    datalist = json.loads((tmp_path / "data" / "dataset.json").read_text())
    datalist["test"][0]["image"] = "missing.nii.gz"
    (tmp_path / "data" / "dataset.json").write_text(json.dumps(datalist))
    proc = _run(stage_command("segmentation_2d", "evaluate", tmp_path, overlay), tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "[test]" in proc.stderr and "missing.nii.gz: file not found" in proc.stderr


def test_compare_rejects_a_mistyped_set_key_before_any_run(tmp_path):
    from medkd.tools.compare import compare

    with pytest.raises(ConfigError, match=r"--pach_size \(did you mean --patch_size\?\)"):
        compare(
            BUNDLES / "segmentation_2d", presets=["kd"], seeds=[0], output=tmp_path, overrides={"pach_size": [64, 64]}
        )
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "bundle, content, fragment",
    [
        ("segmentation_2d", '{"labels": {"0": "background"}, "training": [}', "is not valid JSON"),
        ("segmentation_2d", '{"labels": {"a": "background"}, "training": []}', "must have integer keys"),
        ("segmentation_2d", '{"labels": {"0": "background", "-2": "organ"}}', "distinct non-negative integer keys"),
        ("segmentation_2d", '{"training": []}', "has no 'labels' map"),
        # label values for segmentation; a sample's class index for classification
        ("classification_2d", '{"labels": {"0": "a", "2": "b"}, "training": []}', "0..N-1 for classification"),
    ],
)
def test_bad_datalist_or_labels_map_is_named(bundle, content, fragment, tmp_path):
    from bundle_utils import run_stage

    data = tmp_path / "mine"
    data.mkdir()
    (data / "dataset.json").write_text(content)
    with pytest.raises((RuntimeError, SystemExit)) as err:
        run_stage(bundle, "train_teacher", tmp_path, dataset_dir=str(data), make_default_data=None)
    found = user_error(err.value)
    assert found is not None and str(data / "dataset.json") in str(found) and fragment in str(found), err.value


def test_renamed_keys_name_their_new_name():
    with pytest.raises(
        ConfigError, match=r"--alpha \(renamed --kd_weight\); --delta \(renamed --peer_feature_weight\)"
    ):
        check_overrides([SEG2D / "train.json"], ["alpha", "delta"])
    with pytest.raises(ConfigError, match=r"--best_checkpoints#metric_prefix \(renamed --best_checkpoints#metric\)"):
        check_overrides([SEG2D / "train.json"], ["best_checkpoints#metric_prefix"])
